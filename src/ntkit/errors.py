"""ntkit's typed errors and the one table of failure messages.

Each failure that a user can meet in many places (a kernel that is not positive
definite, an iterative solve that did not converge, a computation that does not fit
in memory) has one type here and one message in `MESSAGES`, naming what happened,
its likely causes and the fixes. Code raises them through `not_positive_definite`,
`did_not_converge` and `out_of_memory`, so the wording is the same everywhere and
callers (the command line) can map the types, not the strings.

Every type subclasses the builtin a caller would catch already: `ValueError`,
`RuntimeError`, `MemoryError`, `RuntimeWarning`.

This module imports nothing of ntkit.
"""

from __future__ import annotations

__all__ = [
    "MESSAGES", "ConvergenceError", "ConvergenceWarning", "IllConditionedWarning",
    "MemoryBudgetError", "ModelFileError", "NotPositiveDefiniteError", "SpecError",
    "StoreError", "did_not_converge",
    "message", "not_positive_definite", "out_of_memory",
]


class NotPositiveDefiniteError(ValueError):
    """A kernel matrix (plus its regulariser) has no Cholesky factor in its dtype."""


class ConvergenceError(RuntimeError):
    """Conjugate gradients stopped above the tolerance (stalled or out of iterations)."""


class ConvergenceWarning(RuntimeWarning):
    """`ConvergenceError`'s message, as a warning, with ``on_failure="warn"``."""


class IllConditionedWarning(RuntimeWarning):
    """A solve went through but its condition number leaves few correct digits."""


class MemoryBudgetError(MemoryError):
    """A computation does not fit in the memory budget or the device's memory."""


class NonFiniteError(ValueError, FloatingPointError):
    """A result (kernel, prediction, solver output) came out NaN or infinite.

    Raised by `check_finite_output` instead of returning the result. A `ValueError`
    (what ntkit's documented failures are) and a `FloatingPointError` (what the
    predictors raised for this before), so callers of either keep working.
    """


class SpecError(ValueError):
    """An architecture spec (string, layer list, JSON/YAML file) that does not parse or
    exceeds `ntkit.spec.SpecLimits`; the message says where and what to do."""


class ModelFileError(ValueError):
    """A model file (`ntkit.sklearn.load`) that is truncated, crafted, or not one that
    `ntkit.sklearn.save` wrote; the message names the entry that is wrong."""


#: The failure messages, by kind: ``what`` happened, likely ``causes``, the ``fixes``.
#: ``{what}`` and ``{detail}`` are filled in by the functions below.
MESSAGES: dict[str, dict[str, str]] = {
    "not_positive_definite": {
        "what": "{what} is not positive definite to working precision{detail}",
        "causes": ("duplicate or nearly duplicate inputs, a kernel that is degenerate on "
                   "these inputs, or rounding in float32"),
        "fixes": ("add diag_reg (e.g. diag_reg=1e-4, relative to the mean diagonal), "
                  "compute in float64 (dtype=torch.float64), or deduplicate the inputs"),
    },
    "did_not_converge": {
        "what": "{what} did not converge{detail}",
        "causes": ("the system is too ill-conditioned for its dtype (a small diag_reg, "
                   "float32), or the preconditioner is too weak"),
        "fixes": ("raise diag_reg (e.g. 1e-4 or 1e-3, relative to the mean diagonal), "
                  "compute in float64 (dtype=torch.float64), use more centres (n_centers) "
                  "or a better preconditioner ('nystrom' with more centres), or loosen tol"),
    },
    "out_of_memory": {
        "what": "{what} does not fit in memory{detail}",
        "causes": ("a memory budget larger than the free memory of the device, or an "
                   "N x N kernel or solve for a large N"),
        "fixes": ("lower memory_budget (smaller tiles), use solver='nystrom' (never an "
                  "N x N matrix) or a kernel store on disk (ntkit.write_kernel_matrix), "
                  "or a device with more memory"),
    },
}


#: Likely causes of a non-finite result, by the kind of computation that made it
#: (`check_finite_output`'s ``causes``); each names the fix.
CAUSES: dict[str, str] = {
    "kernel": (
        "overflow: an input or a pre-activation variance too large for the dtype (inputs "
        "of magnitude 1e20 in float32 or 1e160 in float64 square to infinity); rescale the "
        "inputs (e.g. standardise each feature) or use float64 (x.double()); or a layer's "
        "variance blowing up with depth: a weight scale above the critical one (w_std > "
        "sqrt(2) for ReLU) over many layers, or stacked Exp / exponential activations; "
        "lower w_std, the depth, or remove the stacked exponentials"),
    "empirical": (
        "overflow in the model's outputs or gradients (large inputs or parameters, float32) "
        "or a NaN produced inside the model (0/0, log of 0, sqrt of a negative number); "
        "rescale the inputs, use float64 (model.double(), x.double()), or check that "
        "model(x) is finite"),
    "monte_carlo": (
        "overflow in a sampled network's outputs (inputs too large for the dtype, a weight "
        "scale that explodes with depth, stacked Exp); rescale the inputs, use float64, or "
        "lower w_std or the depth"),
    "prediction": (
        "a train-train kernel too ill-conditioned in its dtype, or kernels or targets of "
        "huge magnitude; add diag_reg (e.g. 1e-4, relative to the mean diagonal), use "
        "float64, or rescale the kernels and targets"),
}


def check_finite_output(value, what: str, *, causes: str = "kernel"):
    """``value`` unchanged if it is finite, else a `NonFiniteError` naming ``what``.

    The one finite-output check at the end of every public computation: one
    ``isfinite().all()`` reduction per tensor (negligible next to computing it).

    Args:
        value: a tensor, or an object whose tensor fields are checked: a `Kernel`
            (``nngp``, ``ntk``), a prediction (``mean``, ``cov``, ``train``, ``test``,
            ``log_marginal_likelihood``), a tuple/list or dict of tensors. None fields
            and non-tensors are skipped.
        what: the result's name in the message, e.g. ``"net.kernel(x1, x2)"``.
        causes: a key of `CAUSES` (or the causes' text itself), named in the message.

    Returns:
        ``value`` itself.

    Raises:
        NonFiniteError: a field has NaN or infinite entries; the message counts them,
            names the field, the dtype and the likely causes with their fixes.
    """
    for field, t in _tensors(value):
        if t.is_floating_point() or t.is_complex():
            if _all_finite(t):
                continue
            n_nan = int(t.isnan().sum())
            n_inf = t.numel() - n_nan - int(t.isfinite().sum())
            name = what + (field if field[:1] in ("", "[") else f".{field}")
            text = CAUSES.get(causes, causes)
            raise NonFiniteError(
                f"{name} is not finite: {n_nan} NaN and {n_inf} infinite of {t.numel()} "
                f"entries ({t.dtype}). Likely causes: {text}.")
    return value


def _all_finite(t) -> bool:
    """Whether every entry of ``t`` is finite, in one pass without a boolean copy
    (1 ms instead of 28 for a 4000 x 4000 float32 kernel): a NaN or infinite entry
    makes the sum non-finite (inf - inf is NaN); a non-finite sum of finite entries
    (an overflow of the sum alone) is settled by the elementwise test."""
    import torch

    if bool(torch.isfinite(t.sum())):
        return True
    return bool(t.isfinite().all())


_FIELDS = ("nngp", "ntk", "mean", "cov", "train", "test", "log_marginal_likelihood", "alpha")


def _tensors(value, field: str = ""):
    """``(field, tensor)`` pairs in ``value`` (see `check_finite_output`)."""
    if value is None:
        return
    if hasattr(value, "isfinite") and hasattr(value, "is_floating_point"):   # a tensor
        yield field, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{field}[{k!r}]")
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{field}[{i}]")
    else:
        for name in _FIELDS:
            if hasattr(value, name):
                yield from _tensors(getattr(value, name), f"{field}.{name}" if field else name)


def message(kind: str, what: str, detail: str = "", fix: str = "") -> str:
    """The message of ``kind`` from `MESSAGES`: what happened (``what`` and
    ``detail``), its likely causes, and the fixes (``fix`` first, when given)."""
    m = MESSAGES[kind]
    head = m["what"].format(what=what, detail=f" ({detail})" if detail else "")
    fixes = f"{fix}; or {m['fixes']}" if fix else m["fixes"]
    return f"{head}. Likely causes: {m['causes']}. Fixes: {fixes}."


def not_positive_definite(what: str, detail: str = "", fix: str = ""
                          ) -> NotPositiveDefiniteError:
    """The `NotPositiveDefiniteError` to raise for matrix ``what``.

    Example: ``raise not_positive_definite("k_train_train + s I", "200 x 200, float32")``.
    """
    return NotPositiveDefiniteError(message("not_positive_definite", what, detail, fix))


def did_not_converge(what: str, detail: str = "", fix: str = "") -> ConvergenceError:
    """The `ConvergenceError` to raise (or whose message to warn with) for ``what``."""
    return ConvergenceError(message("did_not_converge", what, detail, fix))


def out_of_memory(what: str, detail: str = "", fix: str = "") -> MemoryBudgetError:
    """The `MemoryBudgetError` to raise when ``what`` does not fit in memory."""
    return MemoryBudgetError(message("out_of_memory", what, detail, fix))


class StoreError(ValueError):
    """A kernel store (``out=`` of `ntkit.kernel_matrix`) that cannot be used as asked.

    Its fields let a caller word the message in its own terms (the command line's
    ``--store``/``--overwrite``): ``path``, ``reason`` (what is wrong with it) and
    ``fix``, a key of `STORE_FIXES`.
    """

    def __init__(self, path, reason: str, fix: str):
        super().__init__(f"out={str(path)!r} {reason}. {STORE_FIXES[fix]}")
        self.path, self.reason, self.fix = path, reason, fix


#: `StoreError`'s fixes, in the Python API's terms.
STORE_FIXES = {"overwrite": "Pass overwrite=True to discard it, or give another out=.",
               "new_directory": "Give a new or empty directory.",
               "key": ("Pass key= (a string naming what the function computes, e.g. a "
                       "checkpoint's name) to resume, or overwrite=True to start over."),
               "lock": "Wait for that writer to finish, or give another out=.",
               "resume": ("Call again with the same arguments to recompute the damaged "
                          "tiles, or pass overwrite=True to start over.")}
