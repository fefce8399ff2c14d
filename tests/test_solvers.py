"""ntkit.solvers: conjugate gradients, FALKON, CG on on-disk kernels, solvers by name.

Witnesses: dense Cholesky / LU solves of the same regularised ntkit kernel (float64),
the same solve from an in-memory tensor, and plain CG on FALKON's own system.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import one_thread, rel_err

import ntkit as nk
from ntkit import predict, solvers

F64 = torch.float64
N = 2000


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _net():
    return nk.Sequential(nk.Linear(512, w_std=1.5, b_std=0.1), nk.ReLU(),
                         nk.Linear(512, w_std=1.5, b_std=0.1), nk.ReLU(),
                         nk.Linear(1, w_std=1.5, b_std=0.1))


@pytest.fixture(scope="module")
def problem():
    """A smooth target plus noise on 2000 points in 5 dimensions, its NTK, the exact
    regularised solution and test predictions (float64)."""
    with one_thread():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, 5, generator=g, dtype=F64)
        y = torch.cat([torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3],
                       torch.cos(x[:, 3:4])], 1)
        y = y + 0.1 * torch.randn(N, 2, generator=g, dtype=F64)
        xt = torch.randn(300, 5, generator=g, dtype=F64)
        kfn = solvers.kernel_function(_net(), "ntk")
        k = kfn(x, x)
        diag_reg = 1e-3
        s = diag_reg * float(k.diagonal().mean())
        chol = torch.linalg.cholesky(k + s * torch.eye(N, dtype=F64))
        alpha = torch.cholesky_solve(y, chol)
        return dict(x=x, y=y, xt=xt, kfn=kfn, k=k, s=s, diag_reg=diag_reg, alpha=alpha,
                    pred=kfn(xt, x) @ alpha)


# ------------------------------------------------------------------ conjugate_gradient
@pytest.mark.parametrize("precond,n", [("jacobi", N), ("none", 1000)])
def test_cg_matches_cholesky_solve(problem, precond, n):
    """CG on (K + s I) x = Y with three right-hand sides equals the Cholesky solve
    (float64, tol 1e-12: solution within 1e-8 relative) and torch.linalg.solve."""
    k, s, y = problem["k"][:n, :n], problem["s"], problem["y"][:n]
    a = k + s * torch.eye(n, dtype=F64)
    b = torch.cat([y, y[:, :1] * 2 - 1], 1)
    inv = 1 / a.diagonal()
    pc = None if precond == "none" else (lambda r: inv[:, None] * r)
    x, info = solvers.conjugate_gradient(lambda v: a @ v, b, preconditioner=pc, tol=1e-12)
    assert info.converged and info.residual <= 1e-12 and info.residuals[0] == 1.0
    assert info.iterations == len(info.residuals) - 1
    assert rel_err(x, torch.cholesky_solve(b, torch.linalg.cholesky(a))) < 1e-8
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-8
    x1, _ = solvers.conjugate_gradient(lambda v: a @ v, b[:, 0], preconditioner=pc, tol=1e-12)
    assert x1.shape == (n,) and rel_err(x1, x[:, 0]) < 1e-9


def test_cg_zero_column_and_start_point():
    """A zero right-hand side gives a zero column; a start at the solution takes no step."""
    a = torch.diag(torch.arange(1.0, 6.0, dtype=F64))
    b = torch.stack([torch.ones(5, dtype=F64), torch.zeros(5, dtype=F64)], 1)
    x, info = solvers.conjugate_gradient(lambda v: a @ v, b, tol=1e-12)
    assert torch.equal(x[:, 1], torch.zeros(5, dtype=F64)) and info.converged
    assert torch.allclose(x[:, 0], 1 / torch.arange(1.0, 6.0, dtype=F64))
    x2, info2 = solvers.conjugate_gradient(lambda v: a @ v, b, x0=x, tol=1e-12)
    assert info2.iterations == 0 and torch.equal(x2, x)


def _ill_conditioned_float32():
    """A float32 NTK on nearly duplicated points without regularisation: condition number
    far beyond 1 / eps(float32), so CG's residual stalls far above 1e-10."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g)
    x = torch.cat([x, x + 1e-4 * torch.randn(40, 3, generator=g)])
    k = solvers.kernel_function(_net())(x, x)
    return k, torch.randn(80, 1, generator=g)


def test_cg_stall_raises_a_clear_error():
    """A stalled solve raises, naming the residual reached and the remedies; with
    on_failure='warn' it warns the same and returns the best, finite iterate."""
    k, b = _ill_conditioned_float32()
    with pytest.raises(solvers.ConvergenceError) as err:
        solvers.conjugate_gradient(lambda v: k @ v, b, tol=1e-10, max_iter=5000, stall_window=50)
    msg = str(err.value)
    for part in ("relative residual", "stopped decreasing", "diag_reg", "float64",
                 "n_centers", "preconditioner"):
        assert part in msg, part
    with pytest.warns(solvers.ConvergenceWarning, match="relative residual"):
        x, info = solvers.conjugate_gradient(lambda v: k @ v, b, tol=1e-10, max_iter=5000,
                                             stall_window=50, on_failure="warn")
    assert not info.converged and bool(torch.isfinite(x).all())
    assert info.residual == min(info.residuals)
    assert info.iterations < 5000


def test_cg_max_iter_and_nan():
    """max_iter reached above tol says so; a matvec that returns NaN never gives NaN back."""
    k, s = torch.randn(50, 50, generator=torch.Generator().manual_seed(0), dtype=F64), 1e-6
    a = k @ k.T + s * torch.eye(50, dtype=F64)
    b = torch.ones(50, 1, dtype=F64)
    with pytest.raises(solvers.ConvergenceError, match=r"max_iter=3 was reached"):
        solvers.conjugate_gradient(lambda v: a @ v, b, max_iter=3)
    with pytest.raises(FloatingPointError, match="non-finite residual"):
        solvers.conjugate_gradient(lambda v: a @ v * float("nan"), b)
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        solvers.conjugate_gradient(lambda v: v[:10], b)


# ------------------------------------------------------------------ cg_krr
@pytest.mark.parametrize("storage,precond", [
    ("tensor", "nystrom"), ("tensor", "jacobi"), ("tensor", None),
    ("npy", "nystrom"), ("memmap", "nystrom"), ("zarr", "nystrom")])
def test_cg_krr_from_disk_equals_in_memory_solve(problem, tmp_path, storage, precond):
    """cg_krr on the kernel stored on disk (read in row blocks under a small memory
    budget) equals the dense Cholesky solve (1e-7) and cg_krr on the tensor (1e-12)."""
    n = 1000
    k, y = problem["k"][:n, :n].contiguous(), problem["y"][:n]
    s = problem["diag_reg"] * float(k.diagonal().mean())
    want = torch.linalg.solve(k + s * torch.eye(n, dtype=F64), y)
    if storage == "tensor":
        stored = k
    elif storage == "npy":
        np.save(tmp_path / "k.npy", k.numpy())
        stored = np.load(tmp_path / "k.npy", mmap_mode="r")
    elif storage == "memmap":
        stored = np.memmap(tmp_path / "k.bin", dtype=np.float64, mode="w+", shape=k.shape)
        stored[:] = k.numpy()
        stored.flush()
        stored = np.memmap(tmp_path / "k.bin", dtype=np.float64, mode="r", shape=k.shape)
    else:
        zarr = pytest.importorskip("zarr")
        stored = zarr.open(str(tmp_path / "k.zarr"), mode="w", shape=k.shape,
                           chunks=(256, n), dtype="f8")
        stored[:] = k.numpy()
    budget = 8 * 8 * n * 300       # row blocks of 300 rows: 4 blocks, the last one short
    opts = dict(diag_reg=problem["diag_reg"], preconditioner=precond, n_centers=200,
                tol=1e-11, memory_budget=budget)
    alpha, info = solvers.cg_krr(stored, y, **opts)
    assert info.converged and alpha.shape == (n, 2) and alpha.dtype == F64
    assert rel_err(alpha, want) < 1e-7
    if storage != "tensor":
        ref, _ = solvers.cg_krr(k, y, **opts)
        assert rel_err(alpha, ref) < 1e-12


def test_cg_krr_preconditioners_cut_iterations(problem):
    """Nystrom (200 columns) < Jacobi <= no preconditioner, in iterations to 1e-10."""
    its = {}
    for p in ("nystrom", "jacobi", None):
        _, info = solvers.cg_krr(problem["k"][:1000, :1000], problem["y"][:1000],
                                 diag_reg=problem["diag_reg"],
                                 preconditioner=p, n_centers=200, tol=1e-10,
                                 generator=torch.Generator().manual_seed(0))
        its[p] = info.iterations
    assert its["nystrom"] * 2 < its[None] and its["jacobi"] <= its[None], its


# ------------------------------------------------------------------ FALKON
def test_nystrom_approaches_exact_as_centres_grow(problem):
    """Test predictions' error against the exact t = inf predictor falls strictly over
    M = 50, 200, 800, and at M = N equals it to 1e-6."""
    errs = []
    for m in (50, 200, 800, N):
        model = solvers.nystrom_krr(problem["kfn"], problem["x"], problem["y"], n_centers=m,
                                    diag_reg=problem["diag_reg"], tol=1e-10,
                                    generator=torch.Generator().manual_seed(1))
        assert model.centers.shape == (m, 5) and model.alpha.shape == (m, 2)
        assert model.info.converged
        # from the kernel's own diagonal (diagonal=True), which is more accurate than the
        # full kernel's diagonal (arccos near correlation 1 loses ~sqrt(eps))
        assert model.diag_reg_absolute == pytest.approx(problem["s"], rel=1e-7)
        errs.append(rel_err(model.predict(problem["xt"]), problem["pred"]))
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert errs[3] < 1e-6, errs


def test_falkon_preconditioner_cuts_iterations(problem):
    """FALKON's preconditioned CG converges in far fewer iterations than plain CG on the
    same system H a = K_nm^T y / N, H = K_nm^T K_nm / N + lam K_mm, to the same a."""
    x, y, kfn = problem["x"], problem["y"], problem["kfn"]
    m = 400
    model = solvers.nystrom_krr(kfn, x, y, n_centers=m, diag_reg=problem["diag_reg"],
                                tol=1e-8, generator=torch.Generator().manual_seed(2))
    knm = kfn(x, model.centers)
    lam = problem["s"] / N
    h = knm.T @ knm / N + lam * kfn(model.centers, model.centers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", solvers.ConvergenceWarning)
        _, info = solvers.conjugate_gradient(lambda v: h @ v, knm.T @ y / N, tol=1e-8,
                                                 max_iter=3000, on_failure="warn")
    assert model.info.iterations * 10 < info.iterations, (model.info.iterations,
                                                          info.iterations)
    direct = torch.linalg.solve(h, knm.T @ y / N)
    assert rel_err(model.predict(problem["xt"]), kfn(problem["xt"], model.centers) @ direct) < 1e-5


def test_nystrom_tiles_and_cache_change_nothing(problem):
    """Small row tiles, the cache on or off, and float32 kernels with float64 algebra give
    the same predictor; the cache computes K_nm once (2 passes read it, 1 computes it)."""
    x, y = problem["x"][:600], problem["y"][:600]
    calls = []

    def kfn(a, b):
        calls.append(a.shape[0])
        return problem["kfn"](a, b)

    opts = dict(n_centers=100, diag_reg=1e-3, tol=1e-10)
    ref = solvers.nystrom_krr(kfn, x, y, generator=torch.Generator().manual_seed(0),
                              memory_budget="1GiB", cache=False, **opts)
    calls.clear()
    tiled = solvers.nystrom_krr(kfn, x, y, generator=torch.Generator().manual_seed(0),
                                memory_budget=8 * 8 * 100 * 64, cache=True, **opts)
    knm_calls = sum(c for c in calls if c != 100)          # rows of K_nm computed
    assert knm_calls == 600 + 600                           # the diagonal blocks, K_nm once
    assert rel_err(tiled.alpha, ref.alpha) < 1e-10
    f32 = solvers.nystrom_krr(problem["kfn"], x.float(), y.float(), dtype=F64,
                              generator=torch.Generator().manual_seed(0), **opts)
    assert f32.alpha.dtype == F64
    assert rel_err(f32.predict(problem["xt"].float()), ref.predict(problem["xt"])) < 1e-3


def test_nystrom_errors(problem):
    x, y, kfn = problem["x"], problem["y"], problem["kfn"]
    with pytest.raises(TypeError, match="generator=torch.Generator"):
        solvers.nystrom_krr(kfn, x, y, n_centers=10, diag_reg=1e-3)
    with pytest.raises(ValueError, match="diag_reg > 0"):
        solvers.nystrom_krr(kfn, x, y, n_centers=10, diag_reg=0.0,
                            generator=torch.Generator())
    with pytest.raises(ValueError, match="n_centers must be an int between 1 and N"):
        solvers.nystrom_krr(kfn, x, y, n_centers=N + 1, diag_reg=1e-3)


# ------------------------------------------------------------------ by name, and predict
@pytest.mark.parametrize("solver", ["exact", "cg", "nystrom", "auto"])
def test_solve_krr_equals_exact(problem, solver):
    """Every solver (Nystrom with M = N) gives the exact predictor (1e-6); 1-D targets
    give 1-D predictions; 'auto' picks 'exact' for a kernel that fits the budget."""
    x, y = problem["x"][:800], problem["y"][:800]
    k = problem["k"][:800, :800]
    s = problem["diag_reg"] * float(k.diagonal().mean())
    want = problem["kfn"](problem["xt"], x) @ torch.linalg.solve(
        k + s * torch.eye(800, dtype=F64), y)
    model = solvers.solve_krr(problem["kfn"], x, y, solver=solver, diag_reg=problem["diag_reg"],
                              n_centers=800, generator=torch.Generator().manual_seed(0))
    assert model.solver == ("exact" if solver == "auto" else solver)
    assert rel_err(model.predict(problem["xt"]), want) < 1e-6
    one = solvers.solve_krr(problem["kfn"], x, y[:, 0], solver=solver,
                            diag_reg=problem["diag_reg"], n_centers=800,
                            generator=torch.Generator().manual_seed(0))
    assert one.predict(problem["xt"]).shape == (300,)


@pytest.mark.parametrize("solver", ["cg", "nystrom"])
def test_predict_ensemble_solver_equals_exact(solver):
    """gradient_descent_mse_ensemble(solver=...) at t = inf: NNGP and NTK means equal the
    exact path (1e-6 relative; Nystrom at M = N); covariances and finite times are refused."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 4, generator=g, dtype=F64)
    y = torch.randn(300, 2, generator=g, dtype=F64)
    xt = torch.randn(40, 4, generator=g, dtype=F64)
    net = _net()
    ens = predict.gradient_descent_mse_ensemble(net, x, y, diag_reg=1e-3)
    exact = {g_: ens(xt, None, get=g_) for g_ in ("nngp", "ntk")}
    pred = predict.gradient_descent_mse_ensemble(net, x, y, diag_reg=1e-3, solver=solver,
                                                 n_centers=300)
    got = {g_: pred(xt, None, get=g_) for g_ in ("nngp", "ntk")}
    for g_ in ("nngp", "ntk"):
        assert rel_err(got[g_].mean, exact[g_].mean) < 1e-6 and got[g_].cov is None
    twice = pred(xt, [math.inf, math.inf], get="ntk")
    assert twice.mean.shape == (2, 40, 2) and torch.equal(twice.mean[1], got["ntk"].mean)
    with pytest.raises(ValueError, match="compute_cov=True needs"):
        pred(xt, None, get="ntk", compute_cov=True)
    with pytest.raises(ValueError, match="t = inf"):
        pred(xt, 10.0, get="nngp")


def test_gp_inference_cg_equals_exact(tmp_path):
    """gp_inference(solver='cg') means equal the Cholesky path, from Kernel objects and
    from a kernel matrix on disk; covariances are refused."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 4, generator=g, dtype=F64)
    y = torch.randn(300, 1, generator=g, dtype=F64)
    xt = torch.randn(30, 4, generator=g, dtype=F64)
    net = _net()
    kdd, ktd = net.kernel(x), net.kernel(xt, x)
    keys = ("nngp", "ntk", "ntkgp")
    exact = {key: predict.gp_inference(kdd, y, ktd, get=key, diag_reg=1e-3) for key in keys}
    cg = {key: predict.gp_inference(kdd, y, ktd, get=key, diag_reg=1e-3, solver="cg")
          for key in keys}
    for key in keys:
        assert rel_err(cg[key].mean, exact[key].mean) < 1e-6
        assert cg[key].cov is None and cg[key].log_marginal_likelihood is None
    np.save(tmp_path / "k.npy", kdd.ntk.numpy())
    disk = predict.gp_inference(np.load(tmp_path / "k.npy", mmap_mode="r"), y, ktd.ntk,
                                diag_reg=1e-3, solver="cg")
    assert rel_err(disk.mean, exact["ntkgp"].mean) < 1e-6
    with pytest.raises(ValueError, match="covariances need the Cholesky factor"):
        predict.gp_inference(kdd.ntk, y, ktd.ntk, net.kernel(xt).ntk, solver="cg")


# ------------------------------------------------------------------ one adapter, one rule
def test_kernel_function_adapter_equals_net_kernel_for_networks_and_functions():
    """The one adapter: for a network, f(a, b) and f.diagonal(a) equal net.kernel's NTK or
    NNGP (witness: net.kernel itself and the diagonal of the full matrix); for a plain
    function returning Kernels, the diagonal from 256-row blocks equals the full
    diagonal; the old names are the same object; bad sources and selectors are refused."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(300, 5, generator=g, dtype=F64), torch.randn(7, 5, generator=g,
                                                                    dtype=F64)
    net = _net()
    for get in ("nngp", "ntk"):
        f = solvers.kernel_function(net, get)
        assert torch.equal(f(a, b), getattr(net.kernel(a, b), get))
        full = getattr(net.kernel(a), get)
        assert torch.allclose(f.diagonal(a), torch.diagonal(full), rtol=1e-12, atol=0)
        plain = nk.kernel_function.KernelFunction(lambda x1, x2: net.kernel(x1, x2), get)
        assert torch.allclose(plain.diagonal(a), torch.diagonal(full), rtol=1e-12, atol=0)
    whole = nk.kernel_function.KernelFunction(net, dtype=torch.float32)(a, b)
    assert whole.ntk.dtype == torch.float32 and hasattr(whole, "nngp")
    assert solvers.NetworkKernel is nk.kernel_function.KernelFunction
    with pytest.raises(TypeError, match="ntkit network"):
        solvers.kernel_function(torch.nn.Linear(5, 1))
    with pytest.raises(ValueError, match=r"get must be 'ntk' .* or 'nngp' .*, got 'rbf'"):
        solvers.kernel_function(net, "rbf")


def test_diag_reg_is_relative_to_the_float64_mean_diagonal():
    """s = diag_reg * mean(diag K), the mean accumulated in float64 (witness: NumPy's
    float64 mean of the same numbers); absolute scale returns diag_reg; a tensor
    diag_reg stays differentiable (witness: d s / d diag_reg = mean)."""
    g = torch.Generator().manual_seed(8)
    d = (1e4 + torch.rand(100_003, generator=g, dtype=F64) * 1e-3).float()
    want = 1e-3 * float(np.mean(d.numpy().astype(np.float64)))
    assert solvers.diag_reg_absolute(d, 1e-3) == pytest.approx(want, rel=1e-15)
    assert solvers.diag_reg_absolute(d, 0.5, absolute=True) == 0.5
    r = torch.tensor(0.1, dtype=F64, requires_grad=True)
    s = solvers.diag_reg_absolute(d.double(), r)
    (grad,) = torch.autograd.grad(s, r)
    assert float(grad) == pytest.approx(want / 1e-3, rel=1e-12)


def test_auto_solver_rule():
    """'auto' is exact while two N x N kernels fit in the budget (8 bytes an entry in
    float64, 4 in float32), FALKON beyond, and exact whenever finite times are asked
    for; an iterative solver at finite times and unknown names are refused."""
    budget = 2 * 100 * 100 * 8
    assert solvers.resolve_solver("auto", 100, F64, budget) == "exact"
    assert solvers.resolve_solver("auto", 101, F64, budget) == "nystrom"
    assert solvers.resolve_solver("auto", 141, torch.float32, budget) == "exact"
    assert solvers.resolve_solver("auto", 10**6, F64, budget, finite_time=True) == "exact"
    assert solvers.resolve_solver("cg", 10**6, F64, budget) == "cg"
    with pytest.raises(ValueError, match=r"t = inf.*solver='exact'"):
        solvers.resolve_solver("nystrom", 10, F64, budget, finite_time=True)
    with pytest.raises(ValueError, match="solver must be one of"):
        solvers.resolve_solver("lsqr", 10, F64, budget)


def test_failures_are_typed_and_worded_from_one_table():
    """A singular kernel raises NotPositiveDefiniteError (a ValueError) from every path
    with the same cause and fixes; a stalled CG a ConvergenceError with them; each
    message of the table names causes and fixes."""
    from ntkit import errors

    x = torch.randn(6, 3, dtype=F64)
    x = torch.cat([x, x[:2]])                          # repeated points: singular kernel
    net = nk.Sequential(nk.Linear(1))
    y = torch.randn(8, 1, dtype=F64)
    kfn = solvers.kernel_function(net, "nngp")
    fixes = re.escape(errors.MESSAGES["not_positive_definite"]["fixes"])
    with pytest.raises(errors.NotPositiveDefiniteError, match=fixes):
        solvers.exact_krr(kfn, x, y, diag_reg=0.0)
    with pytest.raises(errors.NotPositiveDefiniteError, match=fixes):
        predict.gp_inference(kfn(x, x), y, kfn(x, x))
    with pytest.raises(errors.NotPositiveDefiniteError, match=fixes):
        predict.gradient_descent_mse(kfn(x, x), y)(math.inf, k_test_train=kfn(x, x))
    for kind, m in errors.MESSAGES.items():
        text = errors.message(kind, "X", "detail")
        assert text.startswith("X ") and "(detail)" in text
        assert m["causes"] in text and m["fixes"] in text
    assert issubclass(errors.NotPositiveDefiniteError, ValueError)
    assert issubclass(errors.ConvergenceError, RuntimeError)
    assert issubclass(errors.MemoryBudgetError, MemoryError)
    assert solvers.ConvergenceError is errors.ConvergenceError
    assert isinstance(errors.out_of_memory("a 10 GB kernel"), errors.MemoryBudgetError)


def test_running_out_of_memory_is_a_typed_error_with_the_fixes():
    """A kernel function that runs out of memory (MemoryError) during the exact solve or
    the ensemble's train-train kernels surfaces as MemoryBudgetError (a MemoryError)
    naming the size and the fixes, chained to the original."""
    from ntkit import errors

    def oom(a, b=None):
        raise MemoryError("no room")

    x, y = torch.randn(10, 3, dtype=F64), torch.randn(10, 1, dtype=F64)
    with pytest.raises(errors.MemoryBudgetError, match=r"10 x 10.*solver='nystrom'") as info:
        solvers.exact_krr(oom, x, y, diag_reg=1e-3)
    assert isinstance(info.value.__cause__, MemoryError)
    with pytest.raises(MemoryError, match=r"train-train kernels.*memory_budget"):
        predict.gradient_descent_mse_ensemble(oom, x, y)
