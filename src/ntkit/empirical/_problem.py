"""The checked arguments of an empirical-NTK call, and the checks themselves."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from .._budget import parse_memory
from ..kernel import same_inputs

OUTPUTS = ("trace", "full", "diagonal")

# modules whose fused kernels (torch._VF.rnn_tanh/gru/lstm and the cells) torch.func.vmap
# cannot batch: it fails inside them with a broadcast error ("output with shape [1, H]
# doesn't match the broadcast shape [N, 1, H]") when only the input carries the batch
UNBATCHABLE = (nn.RNNBase, nn.RNNCellBase)
_FLAT_WEIGHTS = "RNN module weights are not part of single contiguous chunk"


def batched_attention():
    """A context in which ``scaled_dot_product_attention`` takes its math backend.

    `torch.func.vmap` has no batching rule for the fused CPU attention kernels
    (``_scaled_dot_product_flash_attention_for_cpu`` and its backward), so under
    ``vmap(jacrev)`` torch runs them once per example and output in a Python-level
    loop (with a "performance drop" warning); the math backend is made of batched
    matrix products and a softmax. Same values (the reference formula), batched.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def unbatchable_modules(model: nn.Module) -> list[str]:
    """The names of ``model``'s submodules that `torch.func.vmap` cannot batch over
    examples (torch's recurrent modules and cells), ``""`` for the model itself."""
    return [name for name, m in model.named_modules() if isinstance(m, UNBATCHABLE)]


def stochastic_modules(model: nn.Module) -> list[nn.Module]:
    """The Dropout modules of ``model`` in training mode (with ``p > 0``): those that draw
    new masks at every call, so that two passes over the same inputs differ."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]


@dataclass
class Problem:
    """One empirical-NTK call: the model, its parameters, the inputs and the budget.

    ``x2`` is None for ``Theta(x1, x1)``; ``out_shape`` is one example's output shape.
    """

    model: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    x1: Tensor
    x2: Tensor | None
    out_shape: tuple[int, ...]
    output: str
    budget: int
    unbatchable: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, model, x1, x2, params, output, memory_budget) -> Problem:
        """Checks the arguments of a public call and gathers what the engines need.

        ``x2`` that is ``x1`` (the same tensor, or a view of the same data) becomes
        None, so that ``Theta(x, x)`` takes the symmetric path.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
        params = _parameters(model, params)
        buffers = dict(model.named_buffers())
        x1 = check_batch(x1, "x1")
        x2 = None if x2 is None else check_batch(x2, "x2")
        if same_inputs(x1, x2):
            x2 = None
        check_dtypes(params, x1, x2)
        _check_no_batch_statistics(model)
        out_shape, first = _output_shape(model, params, buffers, x1)
        if x2 is not None and x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x1 and x2 must have the same per-example shape, got "
                             f"{tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}.")
        # the first example's output alone is the one just computed when the parameters
        # are the model's own (saves a forward pass of fixed cost, for small models)
        own = all(q is not None and p.data_ptr() == q.data_ptr() and p.shape == q.shape
                  for p, q in zip(params.values(), _own_values(model, params)))
        _check_independent(model, x1, first if own else None)
        return cls(model, params, buffers, x1, x2, out_shape, output,
                   parse_memory(memory_budget), unbatchable_modules(model))

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def xs2(self) -> Tensor:
        return self.x1 if self.x2 is None else self.x2

    @property
    def entry(self) -> int:
        return next(iter(self.params.values())).element_size()

    @property
    def out_pairs(self) -> int:
        """Output entries per pair of examples."""
        return self.n_out ** 2 if self.output == "full" else (
            self.n_out if self.output == "diagonal" else 1)

    def check_result_fits(self) -> None:
        n = self.x1.shape[0] * self.xs2.shape[0] * self.out_pairs * self.entry
        limit = _memory_size(next(iter(self.params.values())).device)
        if limit is not None and n > 0.8 * limit:
            raise MemoryError(
                f"output={self.output!r} for {self.x1.shape[0]} x {self.xs2.shape[0]} inputs "
                f"with {self.n_out} outputs each is {n / 2**30:.1f} GiB, more than this "
                f"device's memory ({limit / 2**30:.1f} GiB); use output='trace' or "
                f"'diagonal', or fewer inputs at a time."
            )

    @property
    def loop(self) -> bool:
        """Whether examples go one at a time (the model holds modules vmap cannot batch)."""
        return bool(self.unbatchable)

    def over_examples(self, fn, in_dims: tuple):
        """``vmap(fn, in_dims)``, or for a model with modules vmap cannot batch (torch's
        RNN, GRU, LSTM and their cells) the same map as a loop over the examples (the
        arguments with ``in_dims`` 0), its results stacked: the same values, one example
        at a time, with torch's own kernels and autograd inside."""
        if not self.loop:
            return vmap(fn, in_dims=in_dims)

        def looped(*args):
            n = next(a.shape[0] for a, d in zip(args, in_dims) if d == 0)
            outs = [fn(*(a[i] if d == 0 else a for a, d in zip(args, in_dims)))
                    for i in range(n)]
            return tree_map(lambda *t: torch.stack(t), outs[0], *outs[1:])
        return looped

    def f(self, p: dict[str, Tensor], x: Tensor, a0: int = 0, a1: int | None = None) -> Tensor:
        """The flattened outputs ``a0:a1`` of one example (no batch axis)."""
        with warnings.catch_warnings():
            # functional_call swaps an RNN's weights for tensors outside its flat buffer
            warnings.filterwarnings("ignore", message=_FLAT_WEIGHTS)
            out = functional_call(self.model, (p, self.buffers), (x.unsqueeze(0),))
        out = out.reshape(-1)
        return out if a0 == 0 and a1 in (None, out.shape[0]) else out[a0:a1]


def _memory_size(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


# ------------------------------------------------------------------ checks
def check_dtypes(params: dict[str, Tensor], x1: Tensor, x2: Tensor | None) -> None:
    """Floating-point inputs in one dtype, the parameters' (torch would otherwise fail
    inside the model with a matrix-product message that names neither)."""
    if x2 is not None and x1.is_floating_point() and x2.is_floating_point() \
            and x1.dtype != x2.dtype:
        raise TypeError(
            f"x1 has dtype {x1.dtype} but x2 has dtype {x2.dtype}; the empirical NTK is "
            f"computed in one dtype, so give both the same one, e.g. x2 = x2.to(x1.dtype).")
    dtypes = {p.dtype for p in params.values() if p.is_floating_point()}
    if len(dtypes) == 1 and x1.is_floating_point():
        (dtype,) = dtypes
        if x1.dtype != dtype:
            raise TypeError(
                f"the model's parameters are {dtype} but the inputs are {x1.dtype}; "
                f"convert one to the other: x = x.to({dtype}) or model.to({x1.dtype}).")


def _parameters(model: nn.Module, params: dict[str, Tensor] | None) -> dict[str, Tensor]:
    if params is None:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    else:
        known = dict(model.named_parameters())
        unknown = [n for n in params if n not in known]
        if unknown:
            raise ValueError(f"params names {unknown[:5]} are not parameters of "
                             f"{type(model).__name__}; names are those of "
                             f"model.named_parameters().")
        params = {n: p.detach() for n, p in params.items()}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad), so "
            f"its NTK is zero; pass params= to choose which to differentiate."
        )
    for name, p in params.items():
        if not isinstance(p, Tensor) or not p.is_floating_point() or p.is_complex():
            raise TypeError(
                f"parameter {name!r} has dtype {getattr(p, 'dtype', type(p).__name__)}; the "
                f"empirical NTK needs real floating-point parameters (float32 or float64)."
            )
    return params


def check_batch(x: Tensor, name: str) -> Tensor:
    """``x`` checked: a non-empty real batch ``(N, ...)``, finite if floating-point
    (integer inputs such as token ids pass as they are)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape "
                         f"{tuple(x.shape)}.")
    if x.is_complex():
        raise TypeError(f"{name} has complex dtype {x.dtype}; use real inputs.")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        rows = torch.nonzero(~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).flatten()
        raise ValueError(
            f"{name} has {n_nan} NaN and {int((~torch.isfinite(x)).sum()) - n_nan} infinite "
            f"entries (in examples {rows[:5].tolist()}{', ...' if rows.numel() > 5 else ''}); "
            f"the empirical kernel of non-finite inputs is not finite. Remove or impute "
            f"those examples.")
    return x


def call_model(model: nn.Module, x: Tensor):
    try:
        return model(x)
    except Exception as e:
        raise ValueError(_misfit(model, x, e)) from e


def _misfit(model: nn.Module, x: Tensor, e: Exception) -> str:
    hint = ""
    if not x.is_floating_point():
        hint = (f" x has dtype {x.dtype}: integer inputs suit models that start with an "
                f"embedding; otherwise pass floating-point inputs (x.float()).")
    return (f"{type(model).__name__} cannot be applied to inputs of per-example shape "
            f"{tuple(x.shape[1:])} and dtype {x.dtype} ({type(e).__name__}: {e}); pass x of "
            f"the shape the model takes, with the batch axis first.{hint}")


def _check_no_batch_statistics(model: nn.Module) -> None:
    bn = [n for n, m in model.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if bn:
        raise ValueError(
            f"{type(model).__name__} has BatchNorm in training mode ({', '.join(bn)}), which "
            f"mixes the examples of a batch, so one example's output has no Jacobian of its "
            f"own; call model.eval() to use the running statistics."
        )


def _own_values(model: nn.Module, params: dict[str, Tensor]) -> list[Tensor | None]:
    own = dict(model.named_parameters())
    return [own.get(name) for name in params]


def _check_independent(model: nn.Module, x: Tensor, alone: Tensor | None = None) -> None:
    """Refuses models whose output for one example depends on the batch, or is random.

    ``alone``: the model's output for ``x[:1]`` if already computed."""
    if x.shape[0] < 2:
        return
    with torch.no_grad():
        both = model(x[:2])[:1]
        alone = model(x[:1]) if alone is None else alone
    if not isinstance(both, Tensor) or not isinstance(alone, Tensor):
        raise TypeError("the model must return a tensor (N, *outputs).")
    if both.shape != alone.shape or not torch.allclose(both, alone, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"{type(model).__name__}'s output for an example changes with the rest of the batch "
            f"or between calls (batch statistics, or Dropout in training mode); the empirical "
            f"NTK needs examples treated independently and deterministically: call "
            f"model.eval()."
        )


def _output_shape(model, params, buffers, x: Tensor) -> tuple[tuple[int, ...], Tensor]:
    """One example's output shape, and the output ``(1, *out)`` for ``x[:1]``."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FLAT_WEIGHTS)
            out = functional_call(model, (params, buffers), (x[:1],))
    except Exception as e:
        raise ValueError(_misfit(model, x, e)) from e
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError(
            f"the model must return one floating-point tensor (N, *outputs), got "
            f"{type(out).__name__}" + (f" of dtype {out.dtype}." if isinstance(out, Tensor)
                                       else "; wrap it to return the output to differentiate."))
    if out.ndim < 1 or out.shape[0] != 1:
        raise ValueError(
            f"the model's output for a batch of 1 has shape {tuple(out.shape)}; it must keep "
            f"the batch axis first, (N, *outputs) (a model that reduces over the batch, e.g. "
            f"returns a loss, has no per-example Jacobian)."
        )
    return tuple(out.shape[1:]), out
