"""Fixtures the CLI tests of several files share."""

import pytest

from .lm_runs import TOP2, fit


@pytest.fixture(scope="session")
def trained_top2(tmp_path_factory):
    """One short top-2 run for the tests that need a trained checkpoint: (work dir, data cache dir).
    Its runs/top2/version_0 is read only; a test that writes runs of its own writes them elsewhere."""
    work = tmp_path_factory.mktemp("work")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        fit(TOP2, cache)
    return work, cache
