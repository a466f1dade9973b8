"""A source-code corpus from the Python standard library on this machine: its top-level
modules (Lib/*.py, sorted by name) concatenated into one text file, for the `code` config.

    python benchmarks/make_code_corpus.py code.txt [--max-mb 5]
    jaxchar train code.txt --config code --run-dir runs/code

Nothing is downloaded or committed: every Python installation carries these files (about
4.7 MB in CPython 3.11).
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path


def build(out: Path, max_bytes: int) -> tuple[int, int]:
    """Writes the corpus; returns (files, characters)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a few legacy files are not UTF-8
            continue
        if size + len(text) > max_bytes:
            break
        parts.append(text)
        size += len(text)
    out.write_text("\n".join(parts), encoding="utf-8")
    return len(parts), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the text file to write")
    parser.add_argument("--max-mb", type=float, default=5.0, help="stop before this size")
    args = parser.parse_args()
    files, chars = build(args.out, int(args.max_mb * 1e6))
    print(f"wrote {args.out}: {files} modules, {chars:,} characters")


if __name__ == "__main__":
    main()
