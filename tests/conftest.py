"""Suite-wide test settings."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _hermetic_cache(tmp_path_factory):
    """Keep caches (e.g. the digits classifier) inside the test session, not in ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SRA_CACHE_DIR", str(tmp_path_factory.mktemp("sra-cache")))
    yield
    mp.undo()
