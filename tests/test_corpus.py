import hashlib
import re

import numpy as np
import pytest
from conftest import DATA, SHARED
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxchar.config import DataConfig
from jaxchar.corpus import (
    EMBEDDED,
    NAMED_CORPORA,
    CorpusError,
    UnknownCharactersError,
    Vocab,
    load_corpus,
    normalize,
    prepare,
    read_text,
    resolve_corpus,
    sentence_spans,
    strip_gutenberg,
)


def _naive_spans(text: str, seq: int) -> list[tuple[int, int]]:
    """Sentence pieces by a plain character loop (the reference for sentence_spans)."""
    n, starts = len(text), set()

    def next_solid(q):
        while q < n and text[q].isspace():
            q += 1
        return q

    if next_solid(0) < n:
        starts.add(next_solid(0))
    for p in range(n - 1):
        ends = text[p] in ".!?" and text[p + 1].isspace()
        if (ends or text[p : p + 2] == "\n\n") and next_solid(p + 1) < n:
            starts.add(next_solid(p + 1))
    starts = sorted(starts)
    spans = []
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else n
        a = s
        while a < e - 1:
            spans.append((a, min(a + seq + 1, e)))
            a += seq
    return spans


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="ab .!?\n", max_size=60), st.integers(1, 8))
def test_sentence_spans_equal_a_character_loop(text, seq):
    vocab = Vocab.from_text(text + "x")
    got = sentence_spans(vocab.encode(text), vocab, seq)
    assert got.dtype == np.int32 and got.shape[-1] == 2
    assert [tuple(r) for r in got.tolist()] == _naive_spans(text, seq)


def test_sentence_spans_of_alice_cover_every_character_once(alice_text):
    cfg = DataConfig(objective="sentences", seq_length=50, val_fraction=0.1)
    corpus = prepare(alice_text, cfg)
    text = corpus.vocab.decode(corpus.train_ids)
    spans = corpus.train_spans
    assert [tuple(r) for r in spans.tolist()] == _naive_spans(text, 50)
    assert (spans[:, 1] - spans[:, 0] <= 51).all() and len(corpus.val_spans) > 100
    first = text[spans[1, 0] : spans[1, 1]]
    assert not first[0].isspace()
    # targets: every position after a span's start, once; the rest are sentence starts
    targets = np.zeros(len(text), int)
    for a, b in spans:
        targets[a + 1 : b] += 1
    assert targets.max() == 1 and targets.sum() > 0.97 * len(text)


def test_vocab_round_trip_with_non_ascii():
    text = "Ça va? «naïve» café — 東京 🙂\nend"
    vocab = Vocab.from_text(text)
    assert list(vocab.chars) == sorted(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == np.uint8 and vocab.decode(ids) == text
    assert Vocab.from_json(vocab.to_json()) == vocab


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_vocab_round_trip_any_unicode(text):
    vocab = Vocab.from_text(text)
    assert vocab.decode(vocab.encode(text)) == text


def test_vocab_dtype_grows_with_the_vocabulary():
    big = Vocab(tuple(chr(0x4E00 + i) for i in range(300)))
    assert big.dtype == np.uint16
    text = "".join(big.chars[::-1])
    assert big.decode(big.encode(text)) == text


def test_unknown_characters_are_named_or_skipped():
    vocab = Vocab.from_text("abc ")
    with pytest.raises(UnknownCharactersError, match="'x'.*'z'"):
        vocab.encode("a xz")
    assert vocab.decode(vocab.encode("a xz", unknown="skip")) == "a "


def test_gutenberg_header_and_footer_are_stripped(alice_text):
    body, stripped = strip_gutenberg(alice_text)
    assert "Project Gutenberg" not in body and "*** START" not in body
    assert body.lstrip().startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert "THE END" in body[-200:]
    # what was cut, counted against the text: before + book + after is the whole file
    assert stripped.before + len(body.rstrip("\n")) + stripped.after == len(alice_text)
    assert alice_text[stripped.before :].startswith("ALICE'S ADVENTURES")
    assert 500 < stripped.before < 1000 and 15000 < stripped.after < 25000
    assert "597 characters before" in stripped.describe() and "most" not in stripped.describe()
    assert strip_gutenberg("no markers here") == ("no markers here", None)


GUTENBERG_LIKE = "*** START OF THE PROJECT GUTENBERG EBOOK A TITLE ***"


def _book(before: str, body: str, after: str, start=GUTENBERG_LIKE, end=None) -> str:
    end = end or GUTENBERG_LIKE.replace("START", "END")
    return f"{before}{start}\n{body}{end}\n{after}"


@pytest.mark.parametrize(
    "text",
    [
        # source code that mentions the markers (jaxchar's own corpus.py once did)
        'START, END = "*** START OF", "*** END OF"\n' + "x = 1\n" * 3000,
        "# *** START OF THE PROJECT GUTENBERG EBOOK\n"
        + "y = 2\n" * 3000
        + "# *** END OF THE PROJECT GUTENBERG EBOOK\n",
        # marker lines in the middle of a long text: not where Gutenberg puts them
        _book("a" * 100_000 + "\n", "body\n" * 1000, "z" * 100_000 + "\n"),
        # a marker inside a line, not a line of its own
        "text "
        + GUTENBERG_LIKE
        + "\nbody\n" * 500
        + "text "
        + GUTENBERG_LIKE.replace("START", "END"),
        # only one of the two markers
        _book("", "body\n" * 500, "", end="the end"),
    ],
    ids=["code-strings", "code-comments", "markers-mid-file", "inside-a-line", "no-end"],
)
def test_texts_that_are_not_gutenberg_books_are_kept_whole(text):
    assert strip_gutenberg(text) == (text, None)


@pytest.mark.parametrize(
    "start, end",
    [
        (
            "*** START OF THIS PROJECT GUTENBERG EBOOK X ***",
            "*** END OF THIS PROJECT GUTENBERG EBOOK X ***",
        ),
        (
            "***START OF THE PROJECT GUTENBERG EBOOK X***",
            "***END OF THE PROJECT GUTENBERG EBOOK X***",
        ),
        ("*** START OF THE PROJECT GUTENBERG ETEXT X", "*** END OF THE PROJECT GUTENBERG ETEXT X"),
        (
            "  *** START OF THE PROJECT GUTENBERG EBOOK X ***\r",
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***",
        ),
    ],
)
def test_gutenberg_marker_forms_are_recognised(start, end):
    text = _book("licence\n" * 50, "the book\n" * 2000, "licence\n" * 2000, start, end)
    body, stripped = strip_gutenberg(text)
    assert body == "the book\n" * 2000 and stripped.after > 0


def test_stripping_most_of_a_text_says_so_and_errors_name_the_stripping():
    text = _book("licence\n" * 1000, "a short poem\n", "licence\n" * 1000)
    body, stripped = strip_gutenberg(text)
    assert body == "a short poem\n" and "most of the file" in stripped.describe()
    corpus = prepare(text, DataConfig(seq_length=5, val_fraction=0))
    assert "--keep-gutenberg-header" in corpus.summary(5)
    with pytest.raises(CorpusError, match="after Project Gutenberg header and footer removed"):
        prepare(text, DataConfig(seq_length=100, val_fraction=0))
    kept = prepare(text, DataConfig(seq_length=100, val_fraction=0, strip_gutenberg=False))
    assert kept.total_chars == len(text) and kept.stripped is None


def test_alice_matches_the_tutorial_setup():
    corpus = load_corpus(DATA / "wonderland.txt", DataConfig())
    assert corpus.stripped is not None
    assert len(corpus.vocab) == 45 and corpus.train_ids.dtype == np.uint8
    assert corpus.total_chars == len(corpus.train_ids)
    text = corpus.vocab.decode(corpus.train_ids)
    assert text == text.lower()
    # the body alone: 144,431 characters, so 144,331 windows and 1,128 steps of 128 (the
    # issue's estimate was 1,129 for a slightly different cut of the same book)
    assert len(corpus.train_ids) == 144431
    assert "Total Patterns: 144331" in corpus.summary(100)


@pytest.mark.skipif(
    not (SHARED / "wonderland_utf8_bom.txt").is_file(), reason="../shared/data is not here"
)
def test_bom_file_is_read_as_utf8_without_the_mark():
    text = read_text(SHARED / "wonderland_utf8_bom.txt")
    assert text.startswith("Alice was") and "\ufeff" not in text
    assert "\u2019" in text  # curly quotes survive


def test_normalize_remove_punctuation():
    assert normalize("Hello, World! 'Yes'—no.", True, True) == "hello world yesno"


def test_split_takes_validation_from_the_end():
    text = "abcdefghij" * 30
    corpus = prepare(text, DataConfig(val_fraction=0.2, seq_length=10, strip_gutenberg=False))
    assert len(corpus.val_ids) == 60
    assert corpus.vocab.decode(corpus.val_ids) == text[-60:]


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary\x00", "binary"),
        (b"caf\xe9 ok text", "not valid utf-8"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, words):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=words):
        read_text(path)


def test_other_encodings_and_error_modes(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 ok text")
    assert read_text(path, encoding="latin-1") == "café ok text"
    assert read_text(path, errors="replace") == "caf\ufffd ok text"


def test_missing_file_directory_and_short_text(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="directory"):
        read_text(tmp_path)
    with pytest.raises(CorpusError, match="seq_length"):
        prepare("short text", DataConfig(seq_length=100))


# the sha256 that ../shared/data/README.md records for the published files
PUBLISHED = {
    "wonderland.txt": "85afadc129f83223297f7ef8bad88e2a43f61f0b30f3bbefe2eb87f1bbdd318b",
    "tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}


def test_alice_and_shakespeare_ship_with_the_package_as_published(tmp_path):
    # no folder, no cache, no network: the package's own copies, byte for byte the files
    # whose sha256 ../shared/data/README.md records (read from there where it exists)
    readme = SHARED / "README.md"
    table = readme.read_text() if readme.is_file() else ""
    for name, filename in (("alice", "wonderland.txt"), ("shakespeare", "tinyshakespeare.txt")):
        path = resolve_corpus(name, None, None, download=False)
        assert path == EMBEDDED / filename and path.is_file()
        found = re.search(rf"`{re.escape(filename)}`.*?`([0-9a-f]{{64}})`", table)
        want = found.group(1) if found else PUBLISHED[filename]
        assert want == PUBLISHED[filename]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == want, filename
    # the package's copy wins over a folder's
    assert resolve_corpus("alice", str(tmp_path), tmp_path) == EMBEDDED / "wonderland.txt"


def test_other_named_corpora_resolve_from_the_data_folder_without_network(tmp_path, monkeypatch):
    monkeypatch.setitem(NAMED_CORPORA, "poems", ("poems.txt", "https://example.invalid/p.txt"))
    (tmp_path / "poems.txt").write_text("a poem\n")
    assert resolve_corpus("poems", str(tmp_path), None) == tmp_path / "poems.txt"
    with pytest.raises(CorpusError, match="JAXCHAR_DATA"):
        resolve_corpus("poems", None, None, download=False)
    assert resolve_corpus("some/file.txt", str(DATA)).name == "file.txt"


def test_line_endings_and_the_byte_order_mark_are_normalized_and_said(tmp_path):
    body = "alice was beginning to get very tired of sitting by her sister on the bank. " * 4
    for name, raw, said in (
        ("cr.txt", body.replace(". ", ".\r").encode(), "CR"),
        ("crlf.txt", body.replace(". ", ".\r\n").encode(), "CRLF"),
        ("bom.txt", b"\xef\xbb\xbf" + body.encode(), "byte-order mark"),
    ):
        path = tmp_path / name
        path.write_bytes(raw)
        notes: list[str] = []
        text = read_text(path, notes=notes)
        assert "\r" not in text and "\ufeff" not in text
        assert any(said in n for n in notes), notes
        corpus = load_corpus(path, DataConfig(seq_length=10, val_fraction=0.0))
        assert said in corpus.summary(10)
    plain = tmp_path / "plain.txt"
    plain.write_text(body)
    assert "Read:" not in load_corpus(plain, DataConfig(seq_length=10)).summary(10)


def test_a_lone_cr_gutenberg_file_is_stripped_like_any_other(tmp_path):
    with_lf = (DATA / "wonderland.txt").read_text().replace("\r\n", "\n")
    path = tmp_path / "mac.txt"
    path.write_bytes(with_lf.replace("\n", "\r").encode())
    stripped = load_corpus(path, DataConfig()).stripped
    assert stripped is not None and stripped.before > 0


def test_utf16_and_late_nul_bytes_are_told_apart_from_text(tmp_path):
    text = "alice was beginning to get very tired\n" * 50
    for name, raw in (
        ("bom16.txt", text.encode("utf-16")),  # with its byte-order mark
        ("le16.txt", text.encode("utf-16-le")),  # without one
    ):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(CorpusError, match="--encoding utf-16"):
            read_text(tmp_path / name)
    assert read_text(tmp_path / "bom16.txt", encoding="utf-16").startswith("alice")
    late = tmp_path / "late_nul.txt"
    late.write_bytes(text.encode() * 40 + b"\x00" + b"more text\n")  # past the first 64 KB
    with pytest.raises(CorpusError, match="binary.*offset 76,000"):
        read_text(late)
