"""`LayerNorm` over features and `Dropout`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..kernel import Kernel
from .base import BuildContext, Kernels, Layer, Shapes, single

__all__ = ["LayerNorm", "Dropout", "DropoutModule"]


class LayerNorm(Layer):
    """Normalises each example's features to zero mean and unit variance.

    In the infinite-width limit the feature mean of zero-mean Gaussian
    features vanishes and their mean square is the variance, so (as in
    neural-tangents' ``stax.LayerNorm``)::

        nngp' = nngp / sqrt((v1 + eps)(v2 + eps)),   ntk' = ntk / sqrt((v1 + eps)(v2 + eps))

    The layer has no learnable scale and shift (``torch.nn.LayerNorm(...,
    elementwise_affine=False)``): a per-feature scale's gradient is the feature
    itself, so its NTK contribution through a following nonlinearity ``f`` is
    ``E[X Y f'(X) f'(Y)]``, which the layer-by-layer recursion cannot express.

    Args:
        eps: added to the variance, as in `torch.nn.LayerNorm` (default 1e-5;
            neural-tangents uses 1e-12).
    """

    def __init__(self, eps: float = 1e-5) -> None:
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        self.eps = float(eps)

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        if not k.is_gaussian:
            where = "the raw inputs" if k.is_input else "the output of a nonlinear layer"
            raise ValueError(
                f"{self!r} receives {where}, whose features do not have zero mean; its kernel "
                f"rule needs zero-mean Gaussian features. Put a Linear before LayerNorm."
            )
        r1 = torch.rsqrt(k.cov1 + self.eps)
        r2 = r1 if k.cov2 is k.cov1 else torch.rsqrt(k.cov2 + self.eps)
        if k.diagonal:
            scale = r1 * r2
        else:
            scale = r1.unsqueeze(1) * r2.unsqueeze(0)
        nngp = k.nngp * scale
        ntk = k.ntk * scale
        cov1 = k.cov1 * r1 * r1
        cov2 = cov1 if k.cov2 is k.cov1 else k.cov2 * r2 * r2
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        if not shape or isinstance(shape[0], tuple):
            raise ValueError(f"{self!r} takes one input but receives branches {shape}.")
        if len(shape) > 1:
            raise ValueError(
                f"{self!r} normalises dense features (N, features); got per-example shape {shape}."
            )
        return nn.LayerNorm(shape[0], eps=self.eps, elementwise_affine=False), shape

    def __repr__(self) -> str:
        return f"LayerNorm(eps={self.eps})"


class Dropout(Layer):
    """Zeroes each feature with probability ``p`` and scales the rest by ``1/(1-p)``.

    In ``"train"`` mode (the network as trained), masks are independent across
    examples, so the kernel between different examples is unchanged while an
    example paired with itself in the same forward pass gets ``1/(1-p)``
    (neural-tangents' ``stax.Dropout``). That pairing exists only in
    ``net.kernel(x1)`` (``x2=None``): ``cov`` and the diagonal of ``nngp`` and
    ``ntk`` are scaled. In ``"eval"`` mode the layer is the identity.

    Args:
        p: probability of zeroing a feature, in [0, 1).
        mode: ``"train"`` or ``"eval"``, like `torch.nn.Module.train` / ``eval``.
    """

    def __init__(self, p: float = 0.5, mode: Literal["train", "eval"] = "train") -> None:
        if not 0 <= p < 1:
            raise ValueError(f"p must be in [0, 1), got {p}.")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}.")
        self.p = float(p)
        self.mode = mode

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        if self.mode == "eval" or self.p == 0:
            return k
        if k.is_input:
            raise ValueError(
                "Dropout on the raw inputs has no infinite-width kernel (the input has "
                "finitely many features); put it after a Linear or an activation."
            )
        factor = 1.0 / (1.0 - self.p)
        cov1 = k.cov1 * factor
        cov2 = cov1 if k.cov2 is k.cov1 else k.cov2 * factor
        nngp, ntk = k.nngp, k.ntk
        if k.x1_is_x2:
            nngp, ntk = _scale_diagonal(nngp, factor, k.diagonal), _scale_diagonal(
                ntk, factor, k.diagonal)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        module = DropoutModule(self.p, generator=ctx.generator)
        module.train(self.mode == "train")
        return module, shape

    def __repr__(self) -> str:
        return f"Dropout(p={self.p}, mode={self.mode!r})"


def _scale_diagonal(x: Tensor, factor: float, diagonal: bool) -> Tensor:
    if diagonal:
        return x * factor
    out = x.clone()
    n = min(x.shape[0], x.shape[1])
    idx = torch.arange(n, device=x.device)
    out[idx, idx] = x[idx, idx] * factor
    return out


class DropoutModule(nn.Dropout):
    """`torch.nn.Dropout` whose masks come from an explicit generator.

    With ``generator=None`` it is exactly `torch.nn.Dropout`.
    """

    def __init__(self, p: float, generator: torch.Generator | None = None) -> None:
        super().__init__(p)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        keep = torch.rand(x.shape, generator=self.generator, device=self.generator.device,
                          dtype=x.dtype).to(x.device) >= self.p
        return x * keep / (1 - self.p)
