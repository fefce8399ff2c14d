"""Bundled data for demos and tests."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_digits"]


def load_digits(*, dtype: torch.dtype = torch.float64, standardize: bool = True
                ) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits: 1797 images as ``(1797, 64)``, labels ``(1797,)``.

    Args:
        dtype: dtype of the images.
        standardize: scale each image to zero mean and unit norm per feature
            (``x.x / 64 = 1``), the usual preprocessing for kernels.

    Raises:
        ImportError: when scikit-learn is missing (``pip install ntkit[sklearn]``).
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data ships with scikit-learn; install it with "
            "pip install 'ntkit[sklearn]'"
        ) from e
    data = _load()
    x = torch.as_tensor(data.data, dtype=dtype)
    y = torch.as_tensor(data.target, dtype=torch.long)
    if standardize:
        x = x - x.mean(1, keepdim=True)
        x = x / x.norm(dim=1, keepdim=True) * x.shape[1] ** 0.5
    return x, y
