import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JAXCHAR_DATA") or REPO.parent / "shared" / "data")
ALICE = DATA / "wonderland.txt"


@pytest.fixture(scope="session")
def alice_text() -> str:
    if not ALICE.is_file():
        pytest.fail(f"test corpus missing: {ALICE} (set JAXCHAR_DATA to ../shared/data)")
    return ALICE.read_text(encoding="utf-8")
