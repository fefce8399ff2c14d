"""Infinite-width kernels against Monte Carlo over finite networks, layer type by layer type.

Witness: ``nk.empirical_kernels`` over networks drawn by ``net.build`` (width >= 1024,
fixed seeds): per-sample empirical NNGP ``f f^T / n_out`` and NTK ``J J^T / n_out``, whose
mean estimates ``net.kernel``. Criterion, elementwise for nngp, ntk and cov1::

    |mc_mean - analytic| <= Z * stderr + BIAS_TOL * max|analytic|

``stderr`` is the sample standard deviation over networks / sqrt(n_samples).

BIAS_TOL covers the finite-width bias of the *mean*. For one hidden layer the mean is
exact at any width (hidden units are i.i.d. given the input and the readout is independent
of them; Dropout masks are independent of everything else), so only LayerNorm (empirical
mean and variance over W features) and depth >= 2 (the next pre-activations are Gaussian
only given the previous layer's empirical kernel) carry an O(1/W) bias, c / W with c of
order 1-5: <= 0.5% at W = 1024. 0.02 (= 20 / W) keeps a 4x margin and is still far below
the differences between kernels of different layers (see the discrimination tests).

Cost is dominated by a ~10-50 ms overhead per sampled network (vmap of the pullback), so
nets have one hidden layer of width 1024, 4 inputs and 8 outputs (the readout's weights are
the main NNGP noise, ~sqrt(2 / n_out) per sample; 8 outputs cost no more than 1).
"""

from __future__ import annotations

import pytest
import torch

import ntkit as nk

WIDTH = 1024
N_OUT = 8
N_SAMPLES = 64
Z = 5.0
BIAS_TOL = 0.02
FIELDS = ("nngp", "ntk", "cov1")


@pytest.fixture(scope="module")
def x1(make_generator):
    return torch.randn(4, 6, generator=make_generator(11), dtype=torch.float64)


@pytest.fixture(scope="module")
def x2(make_generator):
    return torch.randn(3, 6, generator=make_generator(12), dtype=torch.float64)


def mc_samples(net, x1, x2=None, *, n_samples=N_SAMPLES, seed=0) -> dict[str, torch.Tensor]:
    """Per-sample empirical kernels stacked along a leading axis, by field."""
    rows = list(nk.empirical_kernels(net, x1, x2, n_samples=n_samples,
                                     generator=torch.Generator().manual_seed(seed)))
    out = {f: torch.stack([r[i] for r in rows]) for i, f in enumerate(("nngp", "ntk", "cov1",
                                                                        "cov2"))}
    assert all(r[4] == rows[0][4] for r in rows)
    return out


def mc_violations(samples: dict[str, torch.Tensor], k: nk.Kernel, fields=FIELDS,
                  bias_tol=BIAS_TOL) -> dict[str, str]:
    """Fields whose MC mean misses the analytic kernel by more than the criterion."""
    bad = {}
    for f in fields:
        s = samples[f]
        want = getattr(k, f).to(s.dtype)
        assert s.shape[1:] == want.shape, (f, s.shape, want.shape)
        mean = s.mean(0)
        stderr = s.std(0) / s.shape[0] ** 0.5
        bound = Z * stderr + bias_tol * want.abs().max()
        excess = (mean - want).abs() / bound
        if not bool((excess <= 1).all()):
            z = float(((mean - want).abs() / stderr.clamp_min(1e-300)).max())
            bad[f] = f"max |err|/bound = {float(excess.max()):.2f} (max |z| = {z:.1f})"
    return bad


def assert_mc_agrees(net, x1, x2=None, *, fields=FIELDS, n_samples=N_SAMPLES, seed=0,
                     bias_tol=BIAS_TOL):
    k = net.kernel(x1, x2)
    samples = mc_samples(net, x1, x2, n_samples=n_samples, seed=seed)
    bad = mc_violations(samples, k, fields, bias_tol)
    assert not bad, f"Monte Carlo disagrees with net.kernel: {bad}"
    return samples, k


def head(*layers, out=N_OUT, w_std=1.0, b_std=0.1, **kw) -> nk.Sequential:
    """``layers`` followed by the readout ``Linear(out)``."""
    return nk.Sequential(*layers, nk.Linear(out, w_std=w_std, b_std=b_std, **kw))


def hidden(act: nk.Layer, width: int = WIDTH, w_std: float = 1.0, b_std: float = 0.3):
    return nk.Sequential(nk.Linear(width, w_std=w_std, b_std=b_std), act)


# ------------------------------------------------------------------------------ Linear
LINEAR = {
    "ntk-bias": dict(parameterization="ntk", b_std=0.4),
    "ntk-no-bias": dict(parameterization="ntk", b_std=None),
    "standard-bias": dict(parameterization="standard", b_std=0.4),
    "standard-zero-bias": dict(parameterization="standard", b_std=0.0),
    "standard-no-bias": dict(parameterization="standard", b_std=None),
}


@pytest.mark.parametrize("kw", LINEAR.values(), ids=LINEAR.keys())
def test_linear(x1, kw):
    """Linear -> ReLU -> Linear in both parameterizations, with and without bias
    (standard: the bias gradient adds 1 to the NTK even when b_std = 0, not when None)."""
    net = nk.Sequential(nk.Linear(WIDTH, w_std=1.3, **kw), nk.ReLU(),
                        nk.Linear(N_OUT, w_std=1.1, **kw))
    assert_mc_agrees(net, x1)


@pytest.mark.parametrize("param", ["ntk", "standard"])
def test_linear_alone_cross_kernel(x1, x2, param):
    """A single Linear readout on the raw inputs, k(x1, x2) (two forward passes)."""
    net = nk.Linear(N_OUT, w_std=1.2, b_std=0.5, parameterization=param)
    assert_mc_agrees(net, x1, x2, fields=("nngp", "ntk", "cov1"))


def test_cross_kernel_with_hidden_layer(x1, x2):
    """k(x1, x2) and cov2 of Linear -> Erf -> Linear."""
    net = head(hidden(nk.Erf(1.2, 0.9, 0.1)))
    samples, k = assert_mc_agrees(net, x1, x2, fields=("nngp", "ntk", "cov1", "cov2"))
    assert samples["nngp"].shape[1:] == (4, 3)


# ------------------------------------------------------------------------- activations
ACTIVATIONS = [
    nk.ReLU(), nk.LeakyReLU(0.2), nk.ABReLU(-0.3, 1.7), nk.Abs(), nk.Sign(), nk.Erf(),
    nk.Erf(1.3, 0.7, 0.2), nk.GELU(), nk.Sin(), nk.Cos(0.9, 1.1, 0.4), nk.Rbf(0.6),
    nk.Gaussian(1.0, -0.5), nk.Exp(0.5, 0.4), nk.Monomial(2), nk.RectifiedMonomial(2),
    nk.Elementwise(torch.tanh), nk.Elementwise(torch.nn.SiLU()),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
def test_activation(x1, act):
    """Linear -> act -> Linear(8). For Sign the MC NTK has only the readout's part (sign' =
    0 under autograd), which is what the kernel says too."""
    assert_mc_agrees(head(hidden(act)), x1)


# ------------------------------------------------------------------- normalization etc.
def test_layernorm(x1):
    """Linear(b=0.5) -> LayerNorm -> ReLU -> Linear: the empirical mean / variance over the
    1024 features of each example (O(1/W) bias, within BIAS_TOL)."""
    net = head(nk.Linear(WIDTH, w_std=1.4, b_std=0.5), nk.LayerNorm(), nk.ReLU())
    assert_mc_agrees(net, x1)


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_dropout_train(x1, p):
    """Linear -> ReLU -> Dropout(p) -> Linear in train mode, k(x1, x1) in one forward pass:
    masks are shared by an example and itself, so the diagonal carries 1/(1-p)."""
    body = hidden(nk.ReLU())
    net = head(body, nk.Dropout(p))
    samples, k = assert_mc_agrees(net, x1)
    # Right after Dropout the kernel is the dropout-free one with the diagonal and cov1
    # times 1/(1-p), the rest unchanged ...
    kd, k0 = nk.Sequential(body, nk.Dropout(p)).kernel(x1), body.kernel(x1)
    eye = torch.eye(len(x1), dtype=torch.bool)
    for f in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(kd, f)[eye], getattr(k0, f)[eye] / (1 - p))
        torch.testing.assert_close(getattr(kd, f)[~eye], getattr(k0, f)[~eye])
    torch.testing.assert_close(kd.cov1, k0.cov1 / (1 - p))
    # ... and the Monte Carlo diagonal after the readout sees the factor: it is far above
    # the dropout-free kernel's (for which MC agreement was checked in test_activation).
    no_dropout = head(body).kernel(x1)
    diag_mean = samples["nngp"].diagonal(dim1=1, dim2=2).mean(0)
    assert bool((diag_mean > no_dropout.nngp.diagonal() * (1 + 0.5 * p / (1 - p))).all())


def test_dropout_train_cross_kernel_is_unscaled(x1):
    """k(x1, x1.clone()) takes two forward passes with independent masks: no 1/(1-p) on
    the diagonal, only on cov1 / cov2 (each within one pass)."""
    p = 0.5
    body = hidden(nk.ReLU())
    kd = nk.Sequential(body, nk.Dropout(p)).kernel(x1, x1.clone())
    k0 = body.kernel(x1, x1.clone())
    torch.testing.assert_close(kd.nngp, k0.nngp)
    torch.testing.assert_close(kd.ntk, k0.ntk)
    torch.testing.assert_close(kd.cov2, k0.cov2 / (1 - p))
    net = head(body, nk.Dropout(p))
    assert_mc_agrees(net, x1, x1.clone(), fields=("nngp", "ntk", "cov1", "cov2"))


def test_dropout_eval(x1):
    """mode='eval' is the identity: kernel and Monte Carlo as without the layer."""
    net = head(hidden(nk.ReLU()), nk.Dropout(0.5, mode="eval"))
    k0 = head(hidden(nk.ReLU())).kernel(x1)
    k = net.kernel(x1)
    torch.testing.assert_close(k.nngp, k0.nngp, rtol=0, atol=0)
    torch.testing.assert_close(k.ntk, k0.ntk, rtol=0, atol=0)
    assert_mc_agrees(net, x1)


# --------------------------------------------------------------------------- branches
def test_fanout_parallel_faninsum(x1):
    """FanOut(2) -> Parallel(Linear -> ReLU, Linear -> Erf) -> FanInSum -> Linear:
    the branches' kernels add."""
    net = head(nk.FanOut(2),
               nk.Parallel(hidden(nk.ReLU(), w_std=1.2, b_std=0.2),
                           hidden(nk.Erf(), w_std=0.8, b_std=0.1)),
               nk.FanInSum())
    assert_mc_agrees(net, x1)


def test_fanin_concat_different_widths(x1):
    """Branches of widths 1024 and 2048, concatenated: the width-weighted mean."""
    net = head(nk.FanOut(2),
               nk.Parallel(hidden(nk.ReLU(), width=WIDTH, w_std=1.2, b_std=0.2),
                           hidden(nk.Erf(), width=2 * WIDTH, w_std=0.8, b_std=0.1)),
               nk.FanInConcat())
    assert_mc_agrees(net, x1)
    # Discriminative: equal weights (1/2, 1/2) would be a different kernel.
    equal = head(nk.FanOut(2),
                 nk.Parallel(hidden(nk.ReLU(), width=WIDTH, w_std=1.2, b_std=0.2),
                             hidden(nk.Erf(), width=WIDTH, w_std=0.8, b_std=0.1)),
                 nk.FanInConcat())
    assert (net.kernel(x1).nngp - equal.kernel(x1).nngp).abs().max() > 0.05


@pytest.mark.parametrize("branches", ["nonlinear", "gaussian"])
def test_fanin_prod(x1, branches):
    """Product of two independent branches (Sin x Erf features, or two Linear outputs)."""
    if branches == "nonlinear":
        par = nk.Parallel(hidden(nk.Sin(), w_std=1.1, b_std=0.2), hidden(nk.Erf()))
    else:
        par = nk.Parallel(nk.Linear(WIDTH, w_std=1.1, b_std=0.2), nk.Linear(WIDTH, b_std=0.5))
    assert_mc_agrees(head(nk.FanOut(2), par, nk.FanInProd()), x1)


def test_identity(x1):
    """Identity layers anywhere change nothing."""
    net = head(nk.Identity(), hidden(nk.ReLU()), nk.Identity())
    k0 = head(hidden(nk.ReLU())).kernel(x1)
    torch.testing.assert_close(net.kernel(x1).ntk, k0.ntk, rtol=0, atol=0)
    assert_mc_agrees(net, x1)


def test_flatten_image_inputs():
    """Flatten of (N, 2, 3, 2) inputs, then Linear -> ReLU -> Linear: the per-position
    input kernel averaged over positions equals the flat dot product / 12."""
    x = torch.randn(4, 2, 3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net = head(nk.Flatten(), hidden(nk.ReLU()))
    torch.testing.assert_close(net.kernel(x).nngp, head(hidden(nk.ReLU())).kernel(
        x.flatten(1)).nngp)
    assert_mc_agrees(net, x)


def test_repeat(x1):
    """Repeat(Linear -> ReLU, 2) -> Linear: two hidden layers with independent parameters
    (one 1024 x 1024 weight: 4 outputs, 24 samples to stay fast)."""
    block = nk.Sequential(nk.Linear(WIDTH, w_std=1.2, b_std=0.2), nk.ReLU())
    net = head(nk.Repeat(block, 2), out=4)
    # build draws each repetition's parameters independently
    small = nk.Repeat(nk.Sequential(nk.Linear(8), nk.ReLU()), 3).build(
        (8,), generator=torch.Generator().manual_seed(0))
    weights = [m.weight for m in small.modules() if getattr(m, "weight", None) is not None]
    assert len(weights) == 3
    assert not any(torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1:])
    assert_mc_agrees(net, x1, n_samples=24)


# ------------------------------------------------------------------- discrimination
def test_criterion_rejects_a_wrong_kernel(x1):
    """The criterion can fail: the MC of a ReLU network does not match the kernel of the
    same architecture with Erf (nor with the first layer's bias dropped)."""
    relu = head(hidden(nk.ReLU()))
    samples = mc_samples(relu, x1)
    assert not mc_violations(samples, relu.kernel(x1))
    assert mc_violations(samples, head(hidden(nk.Erf())).kernel(x1))
    no_bias = head(hidden(nk.ReLU(), b_std=0.0))
    assert mc_violations(samples, no_bias.kernel(x1))


# ------------------------------------------------------------------ the per-sample engine
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout-train"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_samples_are_the_empirical_kernels_of_the_sampled_networks(x1, x2, dropout, cross):
    """Each sample is one network's ``f f^T / n_out`` and ``J J^T / n_out`` (through
    ntkit.empirical). Witness: the same network rebuilt from the same seed, run once per
    batch as the sampler does (so Dropout draws the same masks), its Jacobian taken by
    plain autograd, one output entry at a time."""
    layers = [nk.Linear(64, w_std=1.3, b_std=0.2), nk.Erf()]
    net = head(*layers, *([nk.Dropout(0.4)] if dropout else []), out=3)
    other = x2 if cross else None
    ((nngp, ntk, cov1, cov2, n_out),) = list(nk.empirical_kernels(
        net, x1, other, n_samples=1, generator=torch.Generator().manual_seed(5)))
    model = net.build(tuple(x1.shape[1:]), generator=torch.Generator().manual_seed(5),
                      dtype=x1.dtype)
    params = list(model.parameters())

    def outputs_and_jacobian(x):
        out = model(x).flatten(1)
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params,
                                                                       retain_graph=True)])
                for o in out.reshape(-1)]
        return out.detach(), torch.stack(rows).reshape(out.shape[0], out.shape[1], -1)

    o1, j1 = outputs_and_jacobian(x1)
    o2, j2 = outputs_and_jacobian(x2) if cross else (o1, j1)
    assert n_out == 3
    torch.testing.assert_close(nngp, o1 @ o2.T / 3, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ntk, torch.einsum("iap,jap->ij", j1, j2) / 3,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cov1, o1.square().mean(1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cov2, o2.square().mean(1), rtol=1e-12, atol=1e-14)
    if not cross:
        assert torch.equal(nngp, nngp.T) and torch.equal(ntk, ntk.T)


def test_same_inputs_twice_take_the_symmetric_path(x1):
    """monte_carlo_kernel(net, x, x) (x itself or a view) is monte_carlo_kernel(net,
    x) bit for bit, exactly symmetric; with Dropout in training mode only x itself shares
    the masks: a copy is a second pass (witness: its diagonal differs from one pass's)."""
    def mc(net, x2):
        return nk.monte_carlo_kernel(net, x1, x2, n_samples=3,
                                     generator=torch.Generator().manual_seed(3))

    net = head(nk.Linear(32, b_std=0.2), nk.Erf(), out=2)
    alone = mc(net, None)
    assert torch.equal(alone.ntk, alone.ntk.T) and torch.equal(alone.nngp, alone.nngp.T)
    for x2 in (x1, x1[:]):
        k = mc(net, x2)
        assert k.x1_is_x2
        assert torch.equal(k.ntk, alone.ntk) and torch.equal(k.nngp, alone.nngp)
    copy = mc(net, x1.clone())  # an equal copy is a cross kernel, equal up to rounding
    assert not copy.x1_is_x2
    torch.testing.assert_close(copy.ntk, alone.ntk)
    torch.testing.assert_close(copy.nngp, alone.nngp)
    dropout = head(nk.Linear(32, b_std=0.2), nk.Erf(), nk.Dropout(0.5), out=2)
    alone = mc(dropout, None)
    same = mc(dropout, x1)
    assert torch.equal(same.ntk, alone.ntk) and torch.equal(same.nngp, alone.nngp)
    copy = mc(dropout, x1.clone())
    assert same.x1_is_x2 and not copy.x1_is_x2
    assert not torch.equal(copy.nngp.diagonal(), alone.nngp.diagonal())
