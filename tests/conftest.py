"""Shared fixtures. Real-data tests use ``../shared/data`` beside the checkout and skip when absent.

* ``shared_data`` -- the path of ``../shared/data``; a test that uses it (directly or through another fixture)
  is marked ``realdata`` automatically (``pytest -m "not realdata"`` runs the rest).
* ``_one_thread`` -- every test runs with one torch intra-op thread (restored afterwards): the tensors here
  are tiny, and on a shared, oversubscribed 2-core machine OpenMP threads waiting for each other made some
  tests ~100x slower.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``../shared/data``; skips the test with the reason when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent (it only exists beside the dev checkout)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
