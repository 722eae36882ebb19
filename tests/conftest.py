"""Suite-wide test settings."""

import pytest


@pytest.fixture(autouse=True)
def _hermetic_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own empty ``SRA_CACHE_DIR``: no test can pass on an artefact (e.g. the
    trained digit classifier) that another test left behind, and nothing lands in ~/.cache."""
    monkeypatch.setenv("SRA_CACHE_DIR", str(tmp_path_factory.mktemp("sra-cache")))
