"""The vector-products engine of the empirical NTK: no Jacobian is ever held."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ._problem import Problem, batched_attention


@contextlib.contextmanager
def forward_mode_attention():
    """torch's attention on a path with forward-mode derivatives, for the pushes: the
    math backend of ``scaled_dot_product_attention`` (its fused CPU/GPU kernels have
    no forward-mode rule) and no fused ``TransformerEncoderLayer`` fast path (torch's
    process-wide switch, restored on exit). Same values, other kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


class VectorProducts:
    """``J(x1) (J(x2)^T e)`` for every output basis vector ``e``: no Jacobian held.

    One forward-mode pass carries every parameter's tangent at once; with
    ``split`` (contributions per parameter) there is one pass per parameter.

    For a model with torch's recurrent modules (`Problem.loop`: vmap cannot batch
    them over examples, and the float32 LSTM kernel has no forward-mode derivative)
    both sides are pulled back instead, one example at a time: ``J(x1)^T e`` and
    ``J(x2)^T e`` for every output ``e``, contracted over the parameters. Reverse mode
    only, the same values."""

    def __init__(self, problem: Problem, split: bool):
        self.problem = problem
        self.split = split

    def plan(self) -> tuple[int, int]:
        per = self.problem.n_out * sum(p.numel() for p in self.problem.params.values())
        return max(1, self.problem.budget // (4 * per * self.problem.entry)), self.problem.n_out

    def features(self, x: Tensor, a0: int, a1: int) -> Tensor:
        return x

    def contract(self, a: Tensor, b: Tensor):
        problem = self.problem
        params, f = problem.params, problem.f
        p0 = next(iter(params.values()))

        def pullback(x: Tensor, e: Tensor) -> dict[str, Tensor]:
            return vjp(lambda p: f(p, x), params)[1](e)[0]

        basis = torch.eye(problem.n_out, dtype=p0.dtype, device=p0.device)
        # (N2, O, *param): J2^T e for every example of b and output e
        pullbacks = problem.over_examples(vmap(pullback, in_dims=(None, 0)), (0, None))
        with batched_attention():
            cot = pullbacks(b, basis)
        groups = [[name] for name in params] if self.split else [list(params)]
        if problem.loop:
            with batched_attention():
                rows = pullbacks(a, basis)
            yield from self._pulled_both(rows, cot, groups)
            return
        try:
            for names in groups:
                def push(x: Tensor, t: dict[str, Tensor], names=names) -> Tensor:
                    tangent = {k: t[k] if k in names else torch.zeros_like(v)
                               for k, v in params.items()}
                    return jvp(lambda p: f(p, x), (params,), (tangent,))[1]

                # (N1, N2, O_b, O_a): J1 J2^T restricted to these parameters
                with forward_mode_attention():
                    pushed = vmap(vmap(vmap(push, in_dims=(None, 0)), in_dims=(None, 0)),
                                  in_dims=(0, None))(a, {k: cot[k] for k in names})
                full = pushed.transpose(-1, -2)  # (N1, N2, O_a, O_b)
                if problem.output == "full":
                    yield names[0], full
                else:
                    d = torch.diagonal(full, 0, -2, -1)
                    yield names[0], d.sum(-1) if problem.output == "trace" else d
        except NotImplementedError as e:
            raise NotImplementedError(
                f"method='vector_products' needs forward-mode AD through every operation of "
                f"the model, which PyTorch lacks here ({e}). Use method='jacobian' or "
                f"'structured' (a custom autograd.Function without a jvp rule, for one, has "
                f"no forward-mode derivative)."
            ) from e


    def _pulled_both(self, rows: dict[str, Tensor], cot: dict[str, Tensor], groups):
        """``sum_k rows[i, a, k] cot[j, b, k]`` over each group's parameters, in the
        output layout: the kernel from pullbacks of both sides."""
        output = self.problem.output
        for names in groups:
            part = None
            for k in names:
                u = rows[k].reshape(rows[k].shape[0], rows[k].shape[1], -1)
                v = cot[k].reshape(cot[k].shape[0], cot[k].shape[1], -1)
                eq = {"full": "iak,jbk->ijab", "diagonal": "iak,jak->ija",
                      "trace": "iak,jak->ij"}[output]
                term = torch.einsum(eq, u, v)
                part = term if part is None else part + term
            yield names[0], part
