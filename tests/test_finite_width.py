"""`nk.finite_width`: leading-order 1/width corrections of MLP kernels.

Witnesses:
- exact identities: one hidden layer (the neurons are i.i.d., so the variance
  of the empirical NNGP / NTK is a one-neuron variance over n, written out here
  with the arc-cosine closed forms of Cho & Saul 2009), and ReLU without bias on
  one input, where ``E[G^{l+1 2} | G^l] = G^l^2 (1 + 5 / n_l)`` exactly (Hanin &
  Nica 2019: kurtosis ``prod (1 + 5 / n_l) ~ exp(5 sum 1 / n_l)``);
- Monte Carlo over sampled finite networks: a plain batched simulation written
  from the definitions below (thousands of seeds), fitted as ``a + b / n`` over
  widths, and a smaller run over networks built by ``net.build`` with
  ``nk.empirical_ntk``.
"""

from __future__ import annotations

import math

import pytest
import torch

import ntkit as nk
from ntkit.finite import finite_width, nngp_four_point
from ntkit.finite._moments import moments

F64 = torch.float64


def simulate(x, fn, dfn, widths, sw, sb, n_seeds, gen, param="ntk", chunk=500):
    """Empirical NNGP ``G`` (the readout's metric ``sb^2 + sw^2 s.s / n``) and the NTK of
    one output, ``(S, N, N)`` each, over ``n_seeds`` random MLPs.

    The NTK is written per layer: ``sum_l (lambda_b + lambda_W s^{l-1} . s^{l-1} / n_{l-1})
    (g^l . g^l)`` with ``g^l = df / dz^l`` (backpropagated by hand), ``lambda = sw^2, sb^2``
    in NTK parameterization and ``n_{l-1}, 1`` in standard parameterization.
    """
    n_in = x.shape[1]
    dims = [n_in, *widths, 1]
    gs, ts = [], []
    for start in range(0, n_seeds, chunk):
        c = min(chunk, n_seeds - start)
        ws = [torch.randn(c, dims[i + 1], dims[i], generator=gen, dtype=F64)
              for i in range(len(dims) - 1)]
        bs = [torch.randn(c, 1, dims[i + 1], generator=gen, dtype=F64)
              for i in range(len(dims) - 1)]
        h, acts, pre = x.expand(c, *x.shape), [], []
        for i, (w, b) in enumerate(zip(ws, bs)):
            acts.append(h)
            z = sw / math.sqrt(dims[i]) * h @ w.transpose(1, 2) + sb * b
            pre.append(z)
            h = fn(z)
        g = torch.ones(c, x.shape[0], 1, dtype=F64)
        ntk = 0
        for i in reversed(range(len(ws))):
            lam_w, lam_b = (sw**2, sb**2) if param == "ntk" else (dims[i], 1.0)
            gram = acts[i] @ acts[i].transpose(1, 2) / dims[i]
            ntk = ntk + (lam_b + lam_w * gram) * (g @ g.transpose(1, 2))
            if i:
                g = dfn(pre[i - 1]) * (sw / math.sqrt(dims[i]) * g @ ws[i])
        gs.append(sb**2 + sw**2 * acts[-1] @ acts[-1].transpose(1, 2) / dims[-2])
        ts.append(ntk)
    return torch.cat(gs), torch.cat(ts)


def mlp(act, depth, sw, sb, param="ntk"):
    layers = []
    for _ in range(depth):
        layers += [nk.Linear(8, sw, sb, parameterization=param), act]
    return nk.Sequential(*layers, nk.Linear(1, sw, sb, parameterization=param))


X2 = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8]], dtype=F64)


def relu_moments(v1, v2, k):
    """Cho & Saul (2009) arc-cosine closed forms for ReLU under N(0, [[v1, k], [k, v2]])."""
    th = math.acos(k / math.sqrt(v1 * v2))
    g = math.sqrt(v1 * v2) / (2 * math.pi) * (math.sin(th) + (math.pi - th) * math.cos(th))
    f22 = v1 * v2 / (2 * math.pi) * (3 * math.sin(th) * math.cos(th)
                                     + (math.pi - th) * (1 + 2 * math.cos(th) ** 2))
    d = (math.pi - th) / (2 * math.pi)
    return g, f22, d


@pytest.mark.parametrize("param", ["ntk", "standard"])
def test_one_hidden_layer_closed_form(param):
    """Depth 1: Var = one neuron's variance / n, written with the arc-cosine forms; no
    mean shift (E[G] and E[Theta] are exact at any width)."""
    sw, sb, n = 1.3, 0.4, 50
    net = mlp(nk.ReLU(), 1, sw, sb, param)
    r = finite_width(net, X2, width=n)
    f = X2.shape[1]
    k0 = X2 @ X2.T / f
    k1 = sw**2 * k0 + sb**2
    lam_w, lam_b = (sw**2, sb**2) if param == "ntk" else (f, 1.0)
    theta1 = lam_w * k0 + lam_b
    g, f22, d = relu_moments(k1[0, 0].item(), k1[1, 1].item(), k1[0, 1].item())
    nngp_var = sw**4 / n * (f22 - g * g)
    lam_w2 = sw**2 if param == "ntk" else n
    t1 = theta1[0, 1].item()
    # Theta = lambda_b + mean_k (lambda_W s_a s_b + sw^2 W_k^2 s'_a s'_b Theta1), E W^4 = 3.
    one = (lam_w2**2 * (f22 - g * g) + 2 * lam_w2 * sw**2 * t1 * g * (1 - d)
           + sw**4 * t1**2 * d * (1 - d) + 2 * sw**4 * t1**2 * d)
    torch.testing.assert_close(r.nngp_var[0, 1].item(), nngp_var, rtol=1e-10, atol=0)
    torch.testing.assert_close(r.ntk_var[0, 1].item(), one / n, rtol=1e-10, atol=0)
    torch.testing.assert_close(r.nngp_mean, r.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.ntk_mean, r.ntk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("widths", [[40, 40, 40], [16, 64, 256, 32]], ids=["equal", "mixed"])
def test_relu_single_input_hanin_nica(widths):
    """ReLU, no bias: kurtosis = 1 + 5 sum 1/n_l (leading order of prod(1 + 5/n_l))."""
    net = mlp(nk.ReLU(), len(widths), 1.7, 0.0)
    x = torch.tensor([[0.3, -1.2, 0.7, 2.0]], dtype=F64)
    r = finite_width(net, x, width=widths)
    expected = 1 + 5 * sum(1 / n for n in widths)
    torch.testing.assert_close(r.kurtosis, torch.tensor([expected], dtype=F64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(r.nngp_var[0, 0], (expected - 1) * r.nngp[0, 0] ** 2,
                               rtol=1e-12, atol=0)
    # ReLU is homogeneous: E[G_aa] is linear in G_aa, so no mean shift on the diagonal.
    assert abs((r.nngp_mean - r.nngp).item()) < 1e-12


@pytest.mark.parametrize("act", [nk.ReLU(), nk.LeakyReLU(0.1), nk.Erf(), nk.Sin()],
                         ids=repr)
def test_moments_match_closed_forms(act):
    cov = torch.tensor([[1.3, 0.4, 0.9], [2.0, -0.5, 0.7]], dtype=F64)
    mo = moments(act, cov)
    k, v1, v2 = cov[:, 1], cov[:, 0], cov[:, 2]
    tol = 1e-12 if isinstance(act, nk.ABReLU) else 1e-5  # 48^2-node Gauss-Hermite: ~1e-6
    torch.testing.assert_close(mo.g[:, 1], act._nngp(k, v1, v2), rtol=tol, atol=tol)
    torch.testing.assert_close(mo.d[:, 1], act._dot(k, v1, v2), rtol=tol, atol=tol)
    torch.testing.assert_close(mo.g[:, 0], act._variance(v1), rtol=tol, atol=tol)
    kk = k.clone().requires_grad_()
    grad = torch.autograd.grad(act._dot(kk, v1, v2).sum(), kk)[0]
    torch.testing.assert_close(mo.jac_d[:, 1, 1], grad, rtol=1e-6, atol=1e-8)


def _fit(widths, values, errors):
    """Weighted least squares of ``values = a + b / n``: ``a`` and its standard error."""
    n = torch.tensor(widths, dtype=F64)
    design = torch.stack([torch.ones_like(n), 1 / n], 1) / errors[:, None]
    cov = torch.linalg.inv(design.T @ design)
    coef = cov @ design.T @ (values / errors)
    return coef[0].item(), cov[0, 0].sqrt().item()


@pytest.mark.slow
def test_variances_converge_to_prediction(make_generator):
    """n Var measured at widths 32..128 (thousands of seeds) fitted as a + b/n: ``a``
    agrees with the predicted n Var within 3 standard errors, and a prediction off by
    10% is rejected."""
    gen = make_generator(7)
    sw, sb, seeds = 1.4, 0.3, 6000
    net = mlp(nk.Erf(), 2, sw, sb)
    widths = [32, 64, 128]
    vals, errs = {"nngp": [], "ntk": []}, {"nngp": [], "ntk": []}
    for n in widths:
        g, t = simulate(X2, torch.erf, lambda z: 2 / math.sqrt(math.pi) * torch.exp(-z * z),
                        [n, n], sw, sb, seeds, gen)
        for name, samples in (("nngp", g), ("ntk", t)):
            s = samples[:, 0, 1]
            centred = (s - s.mean()) ** 2
            vals[name].append(n * centred.mean())
            errs[name].append(n * centred.std() / math.sqrt(seeds))
    r = finite_width(net, X2, width=1000)
    for name, pred in (("nngp", r.nngp_var[0, 1] * 1000), ("ntk", r.ntk_var[0, 1] * 1000)):
        a, se = _fit(widths, torch.stack(vals[name]), torch.stack(errs[name]))
        assert abs(a - pred) < 3 * se, (name, a, se, pred.item())
        assert abs(a - 1.1 * pred) > 3 * se, (name, a, se, pred.item())


@pytest.mark.slow
def test_agrees_with_built_networks(make_generator):
    """Networks from ``net.build`` (ntkit's own finite twin and ``nk.empirical_ntk``):
    the variance of the NTK entry at width 64 agrees within sampling error."""
    sw, sb, n, seeds = 1.4, 0.3, 64, 300
    net = nk.Sequential(nk.Linear(n, sw, sb), nk.ReLU(), nk.Linear(n, sw, sb), nk.ReLU(),
                        nk.Linear(1, sw, sb))
    gen = make_generator(3)
    vals = []
    for _ in range(seeds):
        model = net.build((3,), generator=gen, dtype=F64)
        vals.append(nk.empirical_ntk(model, X2)[0, 1])
    vals = torch.stack(vals).reshape(-1)
    var = vals.var()
    se = var * math.sqrt(2 / seeds) * 1.5  # heavier tails than Gaussian: margin 1.5
    pred = finite_width(net, X2, width=n).ntk_var[0, 1]
    assert abs(var - pred) < 3 * se, (var.item(), pred.item(), se.item())


def test_four_point_vertex(make_generator):
    """Cov[G(x_i,x_j), G(x_k,x_l)]: the (i,j,i,j) entries equal nngp_var, the tensor is
    symmetric under swapping the two pairs, and a 3-input entry agrees with Monte Carlo."""
    x = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8], [-0.7, 0.1, 0.9]], dtype=F64)
    net = mlp(nk.Tanh(), 2, 1.4, 0.3)
    n = 64
    r = finite_width(net, x, width=n)
    idx = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 2], [1, 2, 0, 1], [0, 0, 1, 2]])
    v = nngp_four_point(net, x, idx, width=n)
    torch.testing.assert_close(v[0], r.nngp_var[0, 1], rtol=1e-9, atol=0)
    torch.testing.assert_close(v[1], r.nngp_var[1, 1], rtol=1e-9, atol=0)
    torch.testing.assert_close(v[2], v[3], rtol=1e-9, atol=0)
    g, _ = simulate(x, torch.tanh, lambda z: 1 - torch.tanh(z) ** 2,
                    [n, n], 1.4, 0.3, 3000, make_generator(11))
    for q, (i, j, k, l) in enumerate(idx.tolist()):
        a, b = g[:, i, j], g[:, k, l]
        prod = (a - a.mean()) * (b - b.mean())
        se = prod.std() / math.sqrt(len(prod))
        assert abs(prod.mean() - v[q]) < 4 * se + 0.03 * abs(v[q]), (q, prod.mean(), v[q], se)


def test_x2_and_symmetry():
    x1 = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8], [0.3, 0.3, 0.3]], dtype=F64)
    net = mlp(nk.Tanh(), 2, 1.2, 0.2)
    full = finite_width(net, x1, width=32)
    part = finite_width(net, x1, x1[1:], width=32)
    for name in ("nngp", "ntk", "nngp_var", "ntk_var", "nngp_mean", "ntk_mean"):
        # (x1_i, x2_j) and (x2_j, x1_i) use the quadrature in the two orders: ~1e-9.
        torch.testing.assert_close(getattr(part, name), getattr(full, name)[:, 1:],
                                   rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(getattr(full, name), getattr(full, name).T, rtol=0, atol=0)
    k = net.kernel(x1)
    torch.testing.assert_close(full.nngp, k.nngp.to(F64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.ntk, k.ntk.to(F64), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="fully connected"):
        finite_width(nk.Sequential(nk.Linear(4), nk.ReLU()), x, width=8)
    net = mlp(nk.ReLU(), 2, 1.0, 0.0)
    with pytest.raises(ValueError, match="width"):
        finite_width(net, x, width=[8])
    with pytest.raises(ValueError, match="width"):
        finite_width(net, x, width=0)
    with pytest.raises(ValueError, match=r"\(N, features\)"):
        finite_width(net, x[0], width=8)
    with pytest.raises(ValueError, match="index"):
        nngp_four_point(net, x, torch.tensor([[0, 1, 2]]), width=8)
    with pytest.raises(ValueError, match="index must lie"):
        nngp_four_point(net, x, torch.tensor([[0, 1, 2, 3]]), width=8)
    assert nk.finite_width is finite_width


def test_overflowing_results_raise_instead_of_returning_inf():
    """Finite inputs whose kernels overflow float64 give NonFiniteError naming the call,
    not inf/NaN statistics."""
    from ntkit.errors import NonFiniteError

    net = nk.Sequential(nk.Linear(8), nk.ReLU(), nk.Linear(1))
    x = torch.full((2, 3), 1e200, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"finite_width\(\.\.\.\)"):
        nk.finite_width(net, x, width=64)
    with pytest.raises(NonFiniteError, match=r"nngp_four_point\(\.\.\.\)"):
        nk.nngp_four_point(net, x, torch.tensor([[0, 1, 0, 1]]), width=64)
