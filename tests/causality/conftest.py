import pytest


def pytest_collection_modifyitems(items):
    """Everything under tests/causality/ is the leakage suite: `pytest -m causality` runs it alone."""
    for item in items:
        if "tests/causality/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.causality)
