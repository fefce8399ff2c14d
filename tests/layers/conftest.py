"""Fixtures of the layer tests: one intra-op thread (small tensors; much faster when
other processes share the cores), and slow cases skipped unless asked for (-m slow)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Skips tests marked slow unless a marker expression is given (``-m slow``), as
    the ``slow`` marker's description in pyproject.toml says."""
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None and "layers" in item.path.parts:
            item.add_marker(skip)
