"""The benchmarks' own inputs: what they measure must be the work they claim to measure."""

import sys

from conftest import REPO

from jaxchar.config import DataConfig
from jaxchar.corpus import load_corpus

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_memory  # noqa: E402


def test_memory_corpus_is_loaded_whole(tmp_path):
    # 2 MB spans Shakespeare and a copy of Alice; a Gutenberg header left inside the
    # concatenation made the loader keep only Alice's first copy (144k characters)
    path = bench_memory.build_corpus(2, tmp_path)
    size = path.stat().st_size
    assert size == 2 * bench_memory.MB
    assert load_corpus(path, DataConfig()).total_chars == size
