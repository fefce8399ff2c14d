"""Tiling machinery: the progress bar and tile counts."""

from __future__ import annotations

import torch

import ntkit as nk


def _net():
    return nk.Sequential(nk.Linear(8, b_std=0.1), nk.ReLU(), nk.Linear(1))


def test_progress_bar_shown_on_request(capsys):
    """progress=True draws a tqdm bar over the tiles on stderr; False draws none."""
    x = torch.randn(40, 5, dtype=torch.float64)
    _net().kernel(x, memory_budget=40 * 8 * 24 * 25, progress=True)  # ~5x5-entry tiles
    assert "kernel tiles" in capsys.readouterr().err
    _net().kernel(x, memory_budget=40 * 8 * 24 * 25, progress=False)
    assert "kernel tiles" not in capsys.readouterr().err


def test_monte_carlo_progress_bar(capsys):
    """monte_carlo_kernel shows a bar over sampled networks when asked."""
    x = torch.randn(3, 4, dtype=torch.float64)
    nk.monte_carlo_kernel(_net(), x, n_samples=3, generator=torch.Generator().manual_seed(0),
                          progress=True)
    assert "networks" in capsys.readouterr().err
