"""Masks of variable-length inputs as they flow through layers: the per-layer contract.

``net.kernel(x1, x2, mask=(m1, m2))`` gives booleans ``(N, *S)``, True where a
position is present; absent positions of the inputs are zeros (see `ntkit._side`).
The semantics are neural-tangents 0.6.5's (``mask_constant``, each layer's
``mask_fn``, ``Kernel.mask``), with ntkit's True = present:

- A layer declares ``honours_masks = True`` when its kernel rule is right for
  masked inputs. `propagate_layer` (used by the containers and `Layer.kernel`)
  refuses a masked kernel at a layer that does not, naming it, and after a
  layer that does it zeroes every covariance entry that involves an absent
  position of the layer's *output* (`zero_absent`), the kernel of
  neural-tangents' finite networks, whose layers zero their inputs at masked
  positions.
- A layer that changes the spatial shape writes its output's mask with
  ``k.with_side("mask", ...)`` (convolutions and pooling: `window_mask`, the
  mask at each window's centre, neural-tangents' ``_pool_mask``); a layer that
  removes the spatial axes (global pooling, `Flatten`) drops it.
- Position-wise layers (activations, `LayerNorm` over channels, `Dropout`) keep
  the mask; layers that mix positions read it (`GlobalAvgPool` averages over
  present positions, attention leaves absent keys out).
- Finite twins: a twin that reads masks is a `ntkit._side.SideModule`, and
  `ntkit.layers.containers.SideSequential` zeroes every spatial output at its
  absent positions, so that the twin's outputs agree with the kernel (zero there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernel import Kernel

__all__ = ["has_mask", "present_counts", "refuse_mask", "window_mask", "zero_absent"]


def has_mask(k) -> bool:
    """Whether the kernel (or any branch of a tuple of kernels) carries a mask."""
    if isinstance(k, tuple):
        return any(has_mask(b) for b in k)
    return isinstance(k, Kernel) and "mask" in k.side


def refuse_mask(layer) -> ValueError:
    """The error for a layer that receives a masked kernel but cannot honour masks."""
    return ValueError(
        f"{layer!r} does not honour masks (mask= of net.kernel marks the present positions of "
        f"variable-length inputs): its kernel rule has no masked form. Masks are honoured by "
        f"convolutions (Conv1d/2d/3d), pooling, global pooling, Flatten, SelfAttention, "
        f"activations, LayerNorm and Dropout; drop mask= (pad the inputs with zeros instead) "
        f"or replace {type(layer).__name__}.")


def zero_absent(k: Kernel) -> Kernel:
    """``k`` with every covariance entry that involves an absent position set to zero.

    neural-tangents' ``Kernel.mask``: ``nngp``, ``ntk`` at ``(p, p')`` are kept
    where position ``p`` of ``x1`` and ``p'`` of ``x2`` are both present, and the
    self-covariances ``cov1``, ``cov2`` likewise; ``torch.where`` also clears
    values that are not finite there (a normalisation of a zero variance).

    Raises:
        RuntimeError: the mask's spatial shape is not the kernel's (a layer that
            changed the spatial shape without writing its output's mask).
    """
    pair = k.side.get("mask")
    spatial = k.spatial_shape
    if pair is None or not spatial:
        return k
    m1, m2 = pair
    if tuple(m1.shape[1:]) != spatial or tuple(m2.shape[1:]) != spatial:
        raise RuntimeError(
            f"the mask has spatial shape {tuple(m1.shape[1:])} but the kernel {spatial}: a "
            f"layer changed the spatial shape without k.with_side('mask', ...); please report "
            f"this.")
    b1, b2 = k.broadcast_pair(m1, m2)
    both = b1 & b2
    zero = k.nngp.new_zeros(())
    nngp = k.nngp.where(both, zero)
    ntk = k.ntk.where(both, zero)
    a1, a2 = k.broadcast_self(m1)
    cov1 = nngp if k.diagonal else k.cov1.where(a1 & a2, zero)
    if k.cov2 is k.cov1 and m2 is m1:
        cov2 = cov1
    elif k.diagonal:
        cov2 = nngp
    else:
        a1, a2 = k.broadcast_self(m2)
        cov2 = k.cov2.where(a1 & a2, zero)
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, inputs=k.inputs)


def window_mask(mask: Tensor, axes) -> Tensor:
    """The mask of a convolution's or pooling's output: ``(N, *S_out)`` from ``(N, *S)``.

    An output position is present where the centre of its window is (the tap
    ``(size - 1) // 2``, at ``dilation`` spacing): neural-tangents' ``_pool_mask``,
    which strides through the input mask from ``(window - 1) // 2 - pad_before``.
    With 'valid' or 'same' padding every centre is an input position; a centre in
    wider (int) padding takes the mask of the nearest input position, so that a
    mask with every position present stays so.

    Args:
        mask: booleans ``(N, *S)``, True where present.
        axes: one `ntkit.layers._spatial.Axis` per spatial axis (size, stride,
            dilation, padding before and after).
    """
    out = mask
    for i, ax in enumerate(axes):
        dim = 1 + i
        if ax.before or ax.after:  # padding repeats the edge positions' mask
            edge = torch.arange(-ax.before, ax.n + ax.after, device=out.device)
            out = out.index_select(dim, edge.clamp(0, ax.n - 1))
        index = [slice(None)] * out.ndim
        index[dim] = ax.taps((ax.size - 1) // 2)
        out = out[tuple(index)]
    return out.contiguous()


def present_counts(mask: Tensor) -> Tensor:
    """How many positions of each example are present: ``(N,)`` from ``(N, *S)``."""
    return mask.flatten(1).sum(1)
