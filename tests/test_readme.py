"""The README's Python examples run as written (paths pointed at a tiny run)."""

import re
from pathlib import Path

from conftest import DATA, REPO


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(REPO)
    # train first (the last block), then run the others against that run
    train, uses = blocks[-1], blocks[:-1]
    train = (
        train.replace("configs/fast.toml", "configs/tiny.toml")
        .replace("../shared/data/wonderland.txt", str(DATA / "wonderland.txt"))
        .replace("runs/mine", str(tmp_path / "mine"))
    )
    namespace: dict = {}
    exec(compile("import jaxchar\n" + train, "README-train", "exec"), namespace)
    assert (Path(tmp_path) / "mine" / "run.json").is_file()
    namespace = {}
    for i, block in enumerate(uses):
        exec(
            compile(block.replace("runs/alice", str(tmp_path / "mine")), f"README-{i}", "exec"),
            namespace,
        )
    assert namespace["ids"].shape[0] == 8  # the last example: 8 continuations in a user's jit
