"""Text in, integer ids out: reading, Gutenberg stripping, normalization, vocabulary, split.

Everything here is host-side and runs once per training run. The encoded corpus is a compact
integer array (uint8 when the vocabulary fits) whose memory is one or two bytes per character.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxchar.config import DataConfig


class CorpusError(ValueError):
    """A text file or corpus name that cannot be used, with what to do about it."""


# name -> (file name in a data folder, public source). Those whose file is in EMBEDDED ship
# with the package (public domain, 1.3 MB together) and need neither a folder nor a network.
EMBEDDED = Path(__file__).resolve().parent / "corpora"
NAMED_CORPORA: dict[str, tuple[str, str]] = {
    "alice": ("wonderland.txt", "https://www.gutenberg.org/cache/epub/11/pg11.txt"),
    "shakespeare": (
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    ),
}

# Project Gutenberg's marker lines, whole lines as Gutenberg writes them: "*** START OF THE
# PROJECT GUTENBERG EBOOK TITLE ***" (also "THIS", "EBOOK"/"ETEXT", a missing closing "***")
_MARKER = r"^[ \t]*\*\*\*[ \t]*{what} OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)\b[^\n]*$"
_START = re.compile(_MARKER.format(what="START"), re.IGNORECASE | re.MULTILINE)
_END = re.compile(_MARKER.format(what="END"), re.IGNORECASE | re.MULTILINE)
# where they stand in a Gutenberg file: the header's within the opening (the licence before
# the book is at most a few thousand characters), the footer's within the closing part (the
# licence after it is about 19,000 characters)
HEADER_WITHIN, FOOTER_WITHIN = (20_000, 0.1), (40_000, 0.3)  # characters, share of the file


def resolve_corpus(
    spec: str, data_dir: str | None = None, cache_dir: str | Path | None = None, download=True
) -> Path:
    """Turns `alice`, `shakespeare` or a path into the path of a text file.

    Named corpora are the package's own copy where it ships one (both of today's do), else
    looked up in `data_dir`, then in `cache_dir`, and otherwise downloaded once into
    `cache_dir` (written to a temporary name, then renamed, so no half file stays).
    """
    if spec not in NAMED_CORPORA:
        return Path(spec)
    filename, url = NAMED_CORPORA[spec]
    for folder in (EMBEDDED, data_dir, cache_dir):
        if folder and (Path(folder) / filename).is_file():
            return Path(folder) / filename
    if cache_dir is None or not download:
        raise CorpusError(
            f"corpus {spec!r} is not on disk: put {filename} in a folder and set JAXCHAR_DATA to it"
        )
    target = Path(cache_dir) / filename
    partial = target.with_suffix(".part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as response:
            partial.write_bytes(response.read())
        os.replace(partial, target)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise CorpusError(
            f"could not download {spec!r} from {url} ({err.__class__.__name__}); "
            f"save it as {target} or set JAXCHAR_DATA to a folder holding {filename}"
        ) from None
    return target


def read_text(
    path: str | Path,
    encoding: str = "utf-8",
    errors: str = "strict",
    corpus: bool = True,
    notes: list[str] | None = None,
) -> str:
    """Reads a text file; drops a leading byte-order mark and turns CRLF and lone CR into LF
    (each change it made is appended to `notes`, which the corpus summary prints). `corpus`:
    the file is a corpus (a missing one's message names the built-in corpora)."""
    path = Path(path)
    if path.is_dir():
        raise CorpusError(f"{path} is a directory: give the path of a text file inside it")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        hint = " (or use alice, shakespeare)" if corpus else ""
        raise CorpusError(f"{path} does not exist: check the path{hint}") from None
    except PermissionError:
        raise CorpusError(f"{path} cannot be read (permission denied)") from None
    if not raw.strip():
        raise CorpusError(f"{path} is empty: give a file with text in it")
    utf16 = encoding.lower().replace("_", "-").startswith(("utf-16", "utf16"))
    if not utf16 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16's byte-order marks
        raise CorpusError(f"{path} is UTF-16 text: pass --encoding utf-16")
    if not utf16 and b"\x00" in raw:  # the whole file: bytes.find is one fast scan
        if raw[1:200:2].count(0) > 50 or raw[0:200:2].count(0) > 50:  # every other byte
            raise CorpusError(f"{path} looks like UTF-16 text: pass --encoding utf-16")
        where = raw.index(b"\x00")
        raise CorpusError(
            f"{path} looks binary (a NUL byte at offset {where:,}): give a plain text file"
        )
    try:
        text = raw.decode(encoding, errors=errors)
    except LookupError:
        raise CorpusError(f"unknown encoding {encoding!r}: try utf-8, latin-1 or cp1252") from None
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path} is not valid {encoding} (byte {err.start}): pass --encoding "
            "(e.g. latin-1) or --errors replace"
        ) from None
    said = notes if notes is not None else []
    if text.startswith("\ufeff"):
        said.append("a UTF-8 byte-order mark at the start was removed")
        text = text[1:]
    # line ends: CRLF (Windows) and lone CR (classic Mac OS) both become LF
    if "\r" in text:
        crlf = text.count("\r\n")
        text = text.replace("\r\n", "\n")
        lone = text.count("\r")
        text = text.replace("\r", "\n")
        kinds = [f"{n:,} {k}" for n, k in ((crlf, "CRLF"), (lone, "CR")) if n]
        said.append(f"line endings turned into LF ({' and '.join(kinds)})")
    return text


@dataclass(frozen=True)
class Stripped:
    """What Project Gutenberg stripping removed: characters before and after the book."""

    before: int
    after: int
    total: int  # characters of the whole text

    def describe(self) -> str:
        line = (
            f"Project Gutenberg header and footer removed ({self.before:,} characters before "
            f"the book, {self.after:,} after; --keep-gutenberg-header keeps them)"
        )
        if self.before + self.after > self.total / 2:
            line += ": that is most of the file; if it is not a Gutenberg book, keep them"
        return line


def strip_gutenberg(text: str) -> tuple[str, Stripped | None]:
    """Keeps the book between Project Gutenberg's START and END marker lines, when both are
    whole lines where Gutenberg puts them (the START line near the file's start, the END line
    near its end); otherwise the text is returned whole, with None."""
    n = len(text)
    start = _START.search(text, 0, max(HEADER_WITHIN[0], int(n * HEADER_WITHIN[1])))
    if start is None:
        return text, None
    closing_part = n - max(FOOTER_WITHIN[0], int(n * FOOTER_WITHIN[1]))
    end = _END.search(text, max(start.end(), closing_part))
    if end is None:
        return text, None
    lo, hi = start.end() + 1, end.start()  # the book's characters: text[lo:hi]
    hi = lo + len(text[lo:hi].rstrip())
    # older editions close the body with an "End of (the) Project Gutenberg ..." line
    last_line = text.rfind("\n", lo, hi) + 1
    closing = text[max(last_line, lo) : hi].lstrip().lower()
    if closing.startswith(("end of project gutenberg", "end of the project gutenberg")):
        hi = lo + len(text[lo:last_line].rstrip())
    lo += len(text[lo:hi]) - len(text[lo:hi].lstrip("\n"))
    return text[lo:hi] + "\n", Stripped(lo, n - hi, n)


def normalize(text: str, lowercase: bool = True, remove_punctuation: bool = False) -> str:
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        punctuation = {c for c in set(text) if unicodedata.category(c).startswith("P")}
        text = text.translate({ord(c): None for c in punctuation})
    return text


class UnknownCharactersError(CorpusError):
    """Text with characters the vocabulary does not hold: `base` says which, `hint` what to
    do in the command line's words (an HTTP server gives its own request field instead)."""

    def __init__(self, base: str, hint: str):
        super().__init__(f"{base} ({hint})")
        self.base, self.hint = base, hint


@dataclass(frozen=True)
class Vocab:
    """Sorted distinct characters; id i is chars[i]."""

    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned type that holds every id."""
        if len(self) <= 256:
            return np.dtype(np.uint8)
        return np.dtype(np.uint16 if len(self) <= 65536 else np.int32)

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """Text -> ids, chunk by chunk so that memory stays near the text's own size."""
        codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        missing = set(text) - set(self.chars)
        if missing and unknown == "error":
            names = ", ".join(repr(c) for c in sorted(missing)[:10])
            raise UnknownCharactersError(
                f"{len(missing)} character(s) not in the vocabulary: {names}",
                "remove them, or use --unknown skip",
            )
        if missing:
            text = text.translate({ord(c): None for c in missing})
        out = np.empty(len(text), dtype=self.dtype)
        chunk = 1 << 20
        for begin in range(0, len(text), chunk):
            part = np.frombuffer(text[begin : begin + chunk].encode("utf-32-le"), np.uint32)
            out[begin : begin + len(part)] = np.searchsorted(codes, part)
        return out

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        if ids.ndim > 1:
            raise ValueError("decode takes one sequence of ids; decode each row on its own")
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"chars": list(self.chars)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        chars = json.loads(text)["chars"]
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise CorpusError("vocabulary JSON must list single characters")
        return cls(tuple(chars))


SENTENCE_ENDS = ".!?"


def sentence_spans(ids: np.ndarray, vocab: Vocab, seq_length: int) -> np.ndarray:
    """The text cut into sentences for sentence-padded training: [n, 2] int32 (start, stop).

    A sentence ends after one of SENTENCE_ENDS followed by whitespace, or at a blank line;
    the next one starts at the next non-space character (the whitespace in between stays
    with the sentence before, which learns to end). A sentence longer than seq_length + 1
    characters becomes pieces of seq_length + 1 that overlap by one, so every character but
    a sentence's first is a target exactly once. Costs 8 bytes per sentence, not per char."""
    ids = np.asarray(ids)
    if len(ids) < 2:
        return np.zeros((0, 2), np.int32)
    chars = vocab.chars
    is_end = np.array([c in SENTENCE_ENDS for c in chars])[ids]
    is_space = np.array([c.isspace() for c in chars])[ids]
    is_newline = np.array([c == "\n" for c in chars])[ids]
    boundary = (is_end[:-1] & is_space[1:]) | (is_newline[:-1] & is_newline[1:])
    solid = np.flatnonzero(~is_space)  # positions a sentence may start at
    if not len(solid):
        return np.zeros((0, 2), np.int32)
    after = np.searchsorted(solid, np.flatnonzero(boundary) + 1)
    starts = np.unique(np.r_[solid[0], solid[after[after < len(solid)]]])
    stops = np.r_[starts[1:], len(ids)]
    starts, stops = starts[stops - starts >= 2], stops[stops - starts >= 2]
    pieces = -(-(stops - starts - 1) // seq_length)  # ceil((length - 1) / seq_length)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    piece_starts = np.repeat(starts, pieces) + (np.arange(pieces.sum()) - first) * seq_length
    piece_stops = np.minimum(piece_starts + seq_length + 1, np.repeat(stops, pieces))
    return np.stack([piece_starts, piece_stops], axis=1).astype(np.int32)


@dataclass(frozen=True)
class Corpus:
    """The prepared text: vocabulary, train and validation ids, and what was done to it.
    With data.objective = "sentences", also the sentence spans of each split."""

    vocab: Vocab
    train_ids: np.ndarray
    val_ids: np.ndarray
    total_chars: int
    stripped: Stripped | None  # what Gutenberg stripping removed, if it ran
    train_spans: np.ndarray | None = None
    val_spans: np.ndarray | None = None
    notes: tuple[str, ...] = ()  # what reading the file changed (read_text's notes)

    def summary(self, seq_length: int) -> str:
        patterns = max(len(self.train_ids) - seq_length, 0)
        lines = [
            f"Total Characters: {self.total_chars}",
            f"Total Vocab: {len(self.vocab)}",
            f"Total Patterns: {patterns}",
        ]
        if len(self.val_ids):
            lines.append(f"Held out: {len(self.val_ids)} characters (from the end)")
        if self.stripped:
            lines.append(self.stripped.describe())
        lines.extend(f"Read: {note}" for note in self.notes)
        return "\n".join(lines)


def prepare(text: str, cfg: DataConfig, vocab: Vocab | None = None) -> Corpus:
    """Normalizes, builds (or reuses) the vocabulary, encodes and splits the text."""
    stripped = None
    if cfg.strip_gutenberg:
        text, stripped = strip_gutenberg(text)
    # an error after stripping says so: the user may not know it happened
    after = f" (after {stripped.describe()})" if stripped else ""
    text = normalize(text, cfg.lowercase, cfg.remove_punctuation)
    vocab = vocab or Vocab.from_text(text)
    ids = vocab.encode(text)
    n_val = int(len(ids) * cfg.val_fraction)
    train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    if len(train_ids) < cfg.seq_length + 1:
        raise CorpusError(
            f"the text has {len(train_ids)} training characters, fewer than seq_length + 1 = "
            f"{cfg.seq_length + 1}{after}: use a longer text or a smaller data.seq_length"
        )
    if n_val and len(val_ids) < cfg.seq_length + 1:
        raise CorpusError(
            f"the held-out part has {len(val_ids)} characters, fewer than seq_length + 1"
            f"{after}: raise data.val_fraction or lower data.seq_length"
        )
    spans = (None, None)
    if cfg.objective == "sentences":
        spans = tuple(sentence_spans(part, vocab, cfg.seq_length) for part in (train_ids, val_ids))
        if not len(spans[0]):
            raise CorpusError(
                "the text has no sentence of two or more characters: use "
                "data.objective = 'sequence' for it"
            )
    return Corpus(vocab, train_ids, val_ids, len(text), stripped, *spans)


def encode_text(
    text: str, cfg: DataConfig, vocab: Vocab, unknown: str = "error"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Any text prepared as a run's training text was (Gutenberg stripping, normalization)
    and encoded with the run's vocabulary: ids, and the sentence spans for the sentences
    objective (else None). For evaluating a run on another text."""
    if cfg.strip_gutenberg:
        text = strip_gutenberg(text)[0]
    ids = vocab.encode(normalize(text, cfg.lowercase, cfg.remove_punctuation), unknown)
    if len(ids) < cfg.seq_length + 1:
        raise CorpusError(
            f"the text has {len(ids)} characters, fewer than seq_length + 1 = {cfg.seq_length + 1}"
        )
    if cfg.objective != "sentences":
        return ids, None
    spans = sentence_spans(ids, vocab, cfg.seq_length)
    if not len(spans):
        raise CorpusError("the text has no sentence of two or more characters to score")
    return ids, spans


def load_corpus(path: str | Path, cfg: DataConfig) -> Corpus:
    notes: list[str] = []
    corpus = prepare(read_text(path, cfg.encoding, cfg.errors, notes=notes), cfg)
    return dataclasses.replace(corpus, notes=tuple(notes))
