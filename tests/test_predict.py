"""ntkit.predict: closed-form gradient-descent dynamics and GP inference.

Witnesses: neural-tangents' ensemble predictions (tests/data, float64), explicit
matrix exponentials and inverses, and discrete gradient descent with small steps.
"""

from __future__ import annotations

import math

import pytest
import reference
import torch

import ntkit as nk
from ntkit import predict
from ntkit.errors import NotPositiveDefiniteError

F64 = torch.float64
CASE = reference.cases("gradient_descent_mse_ensemble")[0]


def _ensemble():
    a = reference.arrays(CASE["name"])
    net = reference.network(CASE["layers"])
    args = CASE["args"]
    pred = predict.gradient_descent_mse_ensemble(
        net, a["x_train"], a["y_train"], learning_rate=args["learning_rate"],
        diag_reg=args["diag_reg"])
    return pred, a


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_ensemble_matches_neural_tangents(get):
    """Mean and covariance at t = 0.5, 5 and inf, NNGP and NTK, equal neural-tangents'
    (float64, <= 1e-6 relative), from one call with a vector of times."""
    pred, a = _ensemble()
    times = [0.5, 5.0, math.inf]
    out = pred(a["x_test"], times, get=get, compute_cov=True)
    for i, t in enumerate(["0.5", "5.0", "inf"]):
        mean, cov = a[f"{get}_mean_t{t}"], a[f"{get}_cov_t{t}"]
        assert (out.mean[i] - mean).abs().max() <= 1e-6 * mean.abs().max(), t
        assert (out.cov[i] - cov).abs().max() <= 1e-6 * cov.abs().max(), t
    single = pred(a["x_test"], 5.0, get=get)
    assert torch.allclose(single.mean, out.mean[1], rtol=1e-12, atol=0)


def _problem(n=12, o=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nk.Sequential(nk.Linear(64, w_std=1.5, b_std=0.1), nk.ReLU(),
                        nk.Linear(1, w_std=1.5, b_std=0.1))
    x = torch.randn(n, d, generator=g, dtype=F64)
    xt = torch.randn(5, d, generator=g, dtype=F64)
    y = torch.randn(n, o, generator=g, dtype=F64)
    return net, x, xt, y


def test_gradient_descent_mse_equals_matrix_exponential_and_solve():
    """Train and test outputs at several times (one eigendecomposition) equal the
    explicit matrix exponential, and t = inf the explicit solve (float64, 1e-10)."""
    net, x, xt, y = _problem()
    k = net.kernel(x).ntk
    ktd = net.kernel(xt, x).ntk
    f0 = torch.randn_like(y) * 0.1
    g0 = torch.randn(5, 2, dtype=F64) * 0.1
    lr, reg = 0.7, 1e-3
    p = predict.gradient_descent_mse(k, y, learning_rate=lr, diag_reg=reg)
    times = torch.linspace(0, 40, 50, dtype=F64)
    out = p(times, f0, g0, ktd)
    assert isinstance(out, predict.Trajectory)
    train, test = out.train, out.test
    assert train.shape == (50, 12, 2) and test.shape == (50, 5, 2)
    assert p.factorisations == 1
    kr = k + reg * torch.diagonal(k).mean() * torch.eye(12, dtype=F64)
    for i in (0, 7, 49):
        e = torch.linalg.matrix_exp(-lr * times[i] * kr / y.numel())
        want = y + e @ (f0 - y)
        assert (train[i] - want).abs().max() <= 1e-10 * y.abs().max()
        want_t = g0 + ktd @ torch.linalg.solve(kr, (torch.eye(12, dtype=F64) - e) @ (y - f0))
        assert (test[i] - want_t).abs().max() <= 1e-10 * y.abs().max()
    assert torch.allclose(train[0], f0, atol=1e-12) and torch.allclose(test[0], g0, atol=1e-15)
    done = p(math.inf, f0, g0, ktd)
    tr, te = done.train, done.test
    assert torch.allclose(tr, y)
    assert (te - (g0 + ktd @ torch.linalg.solve(kr, y - f0))).abs().max() <= 1e-10
    assert (te - p(1e9, f0, g0, ktd).test).abs().max() <= 1e-8
    # without a test-train kernel: the same training outputs, no test outputs
    alone = p(times, f0)
    assert alone.test is None and torch.equal(alone.train, train)


def test_discrete_gradient_descent_with_small_steps_tracks_the_flow():
    """Steps f <- f - lr K (f - y) / |y| with a small lr, n of them, match the flow
    at t = n * lr (witness: the iteration itself)."""
    net, x, _, y = _problem()
    k = net.kernel(x).ntk
    p = predict.gradient_descent_mse(k, y, learning_rate=1.0)
    lr = 0.01 * predict.max_learning_rate(k, y_size=y.numel())
    f = torch.zeros_like(y)
    for _ in range(2000):
        f = f - lr * k @ (f - y) / y.numel()
    want = p(2000 * lr).train
    assert (f - want).norm() <= 0.01 * want.norm()


def test_max_learning_rate_separates_convergence_from_divergence():
    """Discrete steps just below the bound converge, just above diverge."""
    net, x, _, y = _problem()
    k = net.kernel(x).ntk
    bound = predict.max_learning_rate(k, y_size=y.numel())

    def run(lr):
        f = torch.zeros_like(y)
        for _ in range(3000):
            f = f - lr * k @ (f - y) / y.numel()
        return (f - y).norm()

    assert run(0.95 * bound) < 1e-3 * y.norm()
    assert run(1.05 * bound) > 1e3 * y.norm()


def test_ensemble_limits():
    """t = 0: the prior (zero mean, NNGP covariance); t = inf without diag_reg: the mean
    interpolates the training targets and the variance there vanishes; covariances
    are symmetric positive semi-definite at every time."""
    net, x, xt, y = _problem(n=8)
    pred = predict.gradient_descent_mse_ensemble(net, x, y)
    prior = net.kernel(xt).nngp
    for g in ("nngp", "ntk"):
        at0 = pred(xt, 0.0, get=g, compute_cov=True)
        assert at0.mean.abs().max() == 0
        assert torch.allclose(at0.cov, prior, rtol=1e-12, atol=1e-12)
        done = pred(x, math.inf, get=g, compute_cov=True)
        assert (done.mean - y).abs().max() <= 1e-8 * y.abs().max()
        assert torch.diagonal(done.cov).abs().max() <= 1e-8 * torch.diagonal(prior).max()
        for t in (0.3, 3.0, 30.0, math.inf):
            c = pred(xt, t, get=g, compute_cov=True).cov
            assert torch.equal(c, c.T)
            assert torch.linalg.eigvalsh(c).min() >= -1e-10 * torch.diagonal(c).max()


def test_gp_inference_equals_explicit_posterior_and_likelihood():
    """Posterior mean and covariance by explicit inverses; the log marginal likelihood
    by torch.distributions, and its gradient in the noise by a finite difference."""
    net, x, xt, y = _problem()
    k = net.kernel(x).nngp
    ktd, ktt = net.kernel(xt, x).nngp, net.kernel(xt).nngp
    noise = 0.05
    post = predict.gp_inference(k, y, ktd, ktt, diag_reg=noise, diag_reg_absolute_scale=True)
    kr = k + noise * torch.eye(12, dtype=F64)
    assert torch.allclose(post.mean, ktd @ torch.linalg.solve(kr, y), rtol=1e-10)
    assert torch.allclose(post.cov, ktt - ktd @ torch.linalg.solve(kr, ktd.T), rtol=1e-9,
                          atol=1e-12)
    mvn = torch.distributions.MultivariateNormal(torch.zeros(12, dtype=F64), kr)
    assert torch.allclose(post.log_marginal_likelihood, mvn.log_prob(y.T).sum(), rtol=1e-10)
    s = torch.tensor(noise, dtype=F64, requires_grad=True)
    lml = predict.gp_inference(k, y, ktd, diag_reg=s, diag_reg_absolute_scale=True)
    (grad,) = torch.autograd.grad(lml.log_marginal_likelihood, s)
    h = 1e-6

    def at(v):
        return predict.gp_inference(k, y, ktd, diag_reg=v,
                                    diag_reg_absolute_scale=True).log_marginal_likelihood

    assert torch.allclose(grad, (at(noise + h) - at(noise - h)) / (2 * h), rtol=1e-5)


def test_ill_conditioned_and_bad_inputs_say_what_to_do():
    """A singular kernel at t = inf names diag_reg and float64; shapes, NaN, negative
    times and bad rates are refused; finite times still work on a singular kernel."""
    x = torch.randn(6, 3, dtype=F64)
    x = torch.cat([x, x[:2]])                          # repeated points: singular kernel
    net = nk.Sequential(nk.Linear(1))
    k = net.kernel(x).nngp
    y = torch.randn(8, 1, dtype=F64)
    p = predict.gradient_descent_mse(k, y)
    with pytest.raises(NotPositiveDefiniteError, match=r"diag_reg.*float64"):
        p(math.inf, k_test_train=k)
    assert issubclass(NotPositiveDefiniteError, ValueError)
    assert torch.isfinite(p(10.0).train).all()
    with pytest.raises(ValueError, match=r"square"):
        predict.gradient_descent_mse(k[:, :3], y)
    with pytest.raises(ValueError, match=r"y_train must have shape"):
        predict.gradient_descent_mse(k, y[:3])
    with pytest.raises(ValueError, match=r"NaN"):
        predict.gradient_descent_mse(k, y * float("nan"))
    with pytest.raises(ValueError, match=r"times must be >= 0"):
        p(-1.0)
    with pytest.raises(ValueError, match=r"learning_rate"):
        predict.gradient_descent_mse(k, y, learning_rate=0.0)
    with pytest.raises(ValueError, match=r"diag_reg"):
        predict.gradient_descent_mse(k, y, diag_reg=-1.0)


# ------------------------------------------------------------------ real training
def _train(model, x, y, lr, steps, probes):
    """Full-batch gradient descent on 0.5/|y| ||f - y||^2; outputs at ``probes`` after
    each number of steps in ``steps``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out, done = [], 0
    for target in steps:
        while done < target:
            opt.zero_grad()
            (0.5 * ((model(x) - y) ** 2).sum() / y.numel()).backward()
            opt.step()
            done += 1
        with torch.no_grad():
            out.append(model(probes))
    return out


def _data(n=10, d=16, n_test=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=F64), torch.randn(n_test, d, generator=g,
            dtype=F64), torch.randn(n, 1, generator=g, dtype=F64))


def test_a_wide_trained_network_follows_the_predicted_outputs():
    """A network built by build() (one hidden layer of 32768 ReLUs, NTK parameterization),
    trained by full-batch gradient descent with steps of 5% of the stability bound, has
    train and test outputs within 2% of gradient_descent_mse's (analytic NTK, the
    network's own outputs at initialisation) at four times from early to converged."""
    x, xt, y = _data()
    net = nk.Sequential(nk.Linear(32768, w_std=1.5, b_std=0.1), nk.ReLU(),
                        nk.Linear(1, w_std=1.5, b_std=0.1))
    model = net.build(16, generator=torch.Generator().manual_seed(1), dtype=F64)
    both = torch.cat([x, xt])
    with torch.no_grad():
        f0 = model(both)
    k = net.kernel(x).ntk
    lr = 0.05 * predict.max_learning_rate(k, y_size=y.numel())
    p = predict.gradient_descent_mse(k, y)
    steps = [50, 200, 800, 3000]
    trained = _train(model, x, y, lr, steps, both)
    want = p(torch.tensor(steps, dtype=F64) * lr, f0[:10], f0[10:], net.kernel(xt, x).ntk)
    want_train, want_test = want.train, want.test
    for i, s in enumerate(steps):
        got = trained[i]
        assert (got[:10] - want_train[i]).norm() <= 0.02 * want_train[i].norm(), s
        assert (got[10:] - want_test[i]).norm() <= 0.02 * want_test[i].norm(), s
    # the outputs moved well beyond the tolerance: the check could fail
    assert (want_test[-1] - f0[10:]).norm() > 0.3 * want_test[-1].norm()


def test_an_ensemble_of_trained_networks_matches_the_predicted_mean_and_covariance():
    """32 networks (width 2048, independent initialisations) trained by gradient descent
    to t = 20: their sample mean and covariance on test points agree with the NTK
    ensemble's within 4 standard errors of a 32-sample estimate."""
    x, xt, y = _data(n=8, n_test=3, seed=3)
    net = nk.Sequential(nk.Linear(2048, w_std=1.5, b_std=0.1), nk.ReLU(),
                        nk.Linear(1, w_std=1.5, b_std=0.1))
    k = net.kernel(x).ntk
    lr = 0.1 * predict.max_learning_rate(k, y_size=y.numel())
    steps = round(20.0 / lr)
    outs = []
    for seed in range(32):
        model = net.build(16, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
        outs.append(_train(model, x, y, lr, [steps], xt)[0][:, 0])
    samples = torch.stack(outs)                                     # (32, 3)
    pred = predict.gradient_descent_mse_ensemble(net, x, y)(xt, steps * lr, get="ntk",
                                                            compute_cov=True)
    sd = torch.diagonal(pred.cov).sqrt()
    m = samples.shape[0]
    assert ((samples.mean(0) - pred.mean[:, 0]).abs() <= 4 * sd / math.sqrt(m)).all()
    cov = torch.cov(samples.T)
    scale = torch.outer(sd, sd)
    assert ((cov - pred.cov).abs() <= 4 * math.sqrt(2 / (m - 1)) * scale).all()
    # a prior that ignored training would be caught: the predicted mean moved by more
    assert ((pred.mean[:, 0]).abs() > 4 * sd / math.sqrt(m)).any()


# ------------------------------------------------------------------ any loss
def test_gradient_descent_on_mse_equals_the_closed_form():
    """The ODE route with loss 0.5 * mean((f - y)^2) equals gradient_descent_mse at
    unsorted times, train and test (1e-7)."""
    net, x, xt, y = _problem()
    k, ktd = net.kernel(x).ntk, net.kernel(xt, x).ntk
    f0 = 0.1 * torch.randn(12, 2, dtype=F64)
    ode = predict.gradient_descent(lambda f, t: 0.5 * ((f - t) ** 2).mean(), k, y,
                                   learning_rate=0.5)
    closed = predict.gradient_descent_mse(k, y, learning_rate=0.5)
    times = [4.0, 0.5, 20.0]
    a, b = ode(times, f0, None, ktd), closed(torch.tensor(times, dtype=F64), f0, None, ktd)
    assert (a.train - b.train).abs().max() <= 1e-7 * y.abs().max()
    assert (a.test - b.test).abs().max() <= 1e-7 * y.abs().max()


def _steps(k, f0, grad, lr, n, momentum=0.0):
    f, prev = f0.clone(), f0.clone()
    for _ in range(n):
        f, prev = f + momentum * (f - prev) - lr * k @ grad(f), f
    return f


def test_gradient_descent_on_cross_entropy_tracks_discrete_steps():
    """Cross-entropy on class indices: the ODE's outputs at t = 10 equal 1000 discrete
    function-space steps of 0.01 (witness: the iteration), within 0.5%."""
    net, x, _, _ = _problem()
    k = net.kernel(x).ntk
    labels = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(4))
    ce = torch.nn.functional.cross_entropy
    p = predict.gradient_descent(ce, k, labels)
    f0 = torch.zeros(12, 3, dtype=F64)

    def grad(f):
        f = f.clone().requires_grad_(True)
        return torch.autograd.grad(ce(f, labels), f)[0]

    want = _steps(k, f0, grad, 0.01, 1000)
    got = p(10.0, f0).train
    assert (got - want).norm() <= 5e-3 * want.norm()
    assert (got.argmax(1) == labels).float().mean() > 0.5          # it learned something


@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_momentum_tracks_heavy_ball_steps(momentum):
    """With momentum m, the ODE at t = steps * sqrt(lr) equals discrete heavy-ball steps
    in function space (lr = 1e-3) within 0.5% of the distance travelled."""
    net, x, _, y = _problem()
    k = net.kernel(x).ntk
    lr = 1e-3
    p = predict.gradient_descent(lambda f, t: 0.5 * ((f - t) ** 2).mean(), k, y,
                                 learning_rate=lr, momentum=momentum)
    f0 = torch.zeros_like(y)
    n = int(20 / math.sqrt(lr))
    want = _steps(k, f0, lambda f: (f - y) / y.numel(), lr, n, momentum)
    got = p(n * math.sqrt(lr), f0).train
    assert (got - want).norm() <= 5e-3 * (want - f0).norm()
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        predict.gradient_descent(lambda f, t: f.sum(), k, y, momentum=1.0)
    with pytest.raises(ValueError, match=r"finite times"):
        p(math.inf, f0)


def test_gradient_descent_mse_with_momentum():
    """momentum= on the MSE predictor: finite times equal the momentum ODE, t = inf the
    momentum-free fixed point, in one call."""
    net, x, xt, y = _problem()
    k, ktd = net.kernel(x).ntk, net.kernel(xt, x).ntk
    f0 = torch.zeros_like(y)
    p = predict.gradient_descent_mse(k, y, learning_rate=0.01, momentum=0.8)
    ode = predict.gradient_descent(lambda f, t: 0.5 * ((f - t) ** 2).mean(), k, y,
                                   learning_rate=0.01, momentum=0.8)
    both = p([3.0, math.inf], 0.0, None, ktd)
    train, test = both.train, both.test
    want = ode(3.0, f0, None, ktd)
    want_train, want_test = want.train, want.test
    assert torch.allclose(train[0], want_train, rtol=1e-10, atol=1e-12)
    assert torch.allclose(test[0], want_test, rtol=1e-10, atol=1e-12)
    plain = predict.gradient_descent_mse(k, y)(math.inf, 0.0, None, ktd)
    assert torch.allclose(train[1], plain.train) and torch.allclose(test[1], plain.test)


def test_ensemble_means_in_test_chunks_and_float64_on_request():
    """A budget that splits 200 test inputs into chunks gives the same means; dtype=float64
    computes a float32 network's predictions in float64."""
    net, x, _, y = _problem(n=10)
    xt = torch.randn(200, 4, dtype=F64)
    whole = predict.gradient_descent_mse_ensemble(net, x, y)(xt, [1.0, math.inf], get="ntk")
    small = predict.gradient_descent_mse_ensemble(net, x, y, memory_budget=4000)(
        xt, [1.0, math.inf], get="ntk")
    assert torch.allclose(whole.mean, small.mean, rtol=1e-12, atol=1e-14)
    p64 = predict.gradient_descent_mse_ensemble(net, x.float(), y.float(), dtype=F64)
    out = p64(xt.float(), 2.0, get="nngp")
    assert out.mean.dtype == F64
    assert (out.mean - predict.gradient_descent_mse_ensemble(net, x, y)(
        xt, 2.0, get="nngp").mean).abs().max() <= 1e-4


def test_gp_inference_modes_from_kernels():
    """With Kernel objects: "nngp" and "ntkgp" are the GP posteriors of the two kernels,
    "ntk" equals the converged ensemble (gradient_descent_mse_ensemble at t = inf)."""
    net, x, xt, y = _problem()
    k_dd, k_td, k_tt = net.kernel(x), net.kernel(xt, x), net.kernel(xt)
    out = {g: predict.gp_inference(k_dd, y, k_td, k_tt, get=g, diag_reg=1e-3)
           for g in ("nngp", "ntk", "ntkgp")}
    assert all(isinstance(o, predict.GPPosterior) for o in out.values())
    with pytest.warns(DeprecationWarning, match="one GPPosterior per call"):
        old = predict.gp_inference(k_dd, y, k_td, k_tt, diag_reg=1e-3)
    assert set(old) == {"nngp", "ntk", "ntkgp"}
    assert all(torch.equal(old[g].mean, out[g].mean) for g in old)
    plain = predict.gp_inference(k_dd.ntk, y, k_td.ntk, k_tt.ntk, diag_reg=1e-3)
    assert torch.equal(out["ntkgp"].mean, plain.mean) and torch.equal(out["ntkgp"].cov,
                                                                      plain.cov)
    ens = predict.gradient_descent_mse_ensemble(net, x, y, diag_reg=1e-3)(
        xt, math.inf, get="ntk", compute_cov=True)
    assert torch.allclose(out["ntk"].mean, ens.mean, rtol=1e-9, atol=1e-12)
    assert torch.allclose(out["ntk"].cov, ens.cov, rtol=1e-8, atol=1e-10)
    assert out["ntk"].log_marginal_likelihood is None
    assert (out["nngp"].mean - out["ntkgp"].mean).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"get must be among"):
        predict.gp_inference(k_dd, y, k_td, get="gp")


def test_nearly_singular_float32_kernel_warns_and_names_the_remedies():
    """A float32 kernel that Cholesky still factors but with a condition number near
    1/eps gets a warning naming diag_reg and float64; diag_reg silences it."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, generator=g)
    x = torch.cat([x, x[:1] + 1e-3])               # two nearly equal points
    k = nk.Sequential(nk.Linear(64, b_std=0.1), nk.ReLU(), nk.Linear(1)).kernel(x).nngp
    y = torch.randn(7, 1, generator=g)
    with pytest.warns(RuntimeWarning, match=r"ill-conditioned.*diag_reg.*float64"):
        predict.gradient_descent_mse(k, y)(math.inf, k_test_train=k)
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error")
        predict.gradient_descent_mse(k, y, diag_reg=1e-2)(math.inf, k_test_train=k)


def test_ensemble_returns_one_prediction_per_get_and_reuses_the_test_kernels():
    """One call, one EnsemblePrediction: the two gets on the same test tensor need one
    kernel evaluation (witness: a counting kernel function); a tuple get (deprecated)
    warns and returns the dict of the single calls."""
    net, x, xt, y = _problem()
    calls = []

    def counted(a, b):
        calls.append((a.shape[0], None if b is None else b.shape[0]))
        return net.kernel(a, b)

    pred = predict.gradient_descent_mse_ensemble(counted, x, y, diag_reg=1e-3)
    assert calls == [(12, None)]
    ntk = pred(xt, [1.0, math.inf], get="ntk", compute_cov=True)
    nngp = pred(xt, [1.0, math.inf], get="nngp", compute_cov=True)
    assert isinstance(ntk, predict.EnsemblePrediction) and ntk.mean.shape == (2, 5, 2)
    assert calls == [(12, None), (5, 12), (5, None)]
    assert (ntk.mean - nngp.mean).abs().max() > 1e-3         # two different kernels
    direct = predict.gradient_descent_mse_ensemble(net, x, y, diag_reg=1e-3)
    assert torch.equal(direct(xt, [1.0, math.inf], get="ntk", compute_cov=True).cov, ntk.cov)
    with pytest.warns(DeprecationWarning, match="one EnsemblePrediction per call"):
        both = pred(xt, [1.0, math.inf], get=("nngp", "ntk"), compute_cov=True)
    assert set(both) == {"nngp", "ntk"}
    assert torch.equal(both["ntk"].mean, ntk.mean) and torch.equal(both["nngp"].cov, nngp.cov)
    with pytest.raises(ValueError, match="get must be 'ntk'"):
        pred(xt, 1.0, get="gp")
