"""Reference workloads: ntkit against neural-tangents, measured in the same run.

    python benchmarks/run.py [CASE ...] [--reps N] [--nt-python PATH] [--no-peer]

Each case is timed as the best of ``--reps`` runs after one warm-up, in a fresh
subprocess per library so that peak memory (max RSS) belongs to that case
alone. neural-tangents runs when its python is found (``--nt-python``, the
``NT_PYTHON`` variable, or the default place of
``shared/peers/install-neural-tangents``); its timings come from the peers'
own ``nt_bench.py``. Prints a Markdown table; ``--json PATH`` also saves it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_NT_PYTHON = Path.home() / ".cache/ntkit-peers/nt/bin/python"
PEERS = [ROOT.parent / "shared" / "peers", ROOT / "shared" / "peers"]

#: case -> (description, peers): each peer is (label, runner, runner's case, JSON "case" key);
#: runner "nt" is neural-tangents' nt_bench.py, "torchfunc" the torch.func tutorial's
#: methods (torchfunc_bench.py, run with this python).
CASES = {
    "fc": (("infinite-width NTK, 3 x [Linear(512, w_std=1.4, b_std=0.1), ReLU] + Linear(1), "
           "x: 4000 x 784 float32, k(x, x)"),
           [("neural-tangents", "nt", "fc", "fc_relu_L3_N4000_d784_ntk")]),
    "cnn": (("infinite-width NTK, 2 x [Conv2d(64, 3, padding='same', w_std=1.4, b_std=0.1), "
            "ReLU] + GlobalAvgPool + Linear(1), x: 64 images 3 x 16 x 16 float32, k(x, x)"),
            [("neural-tangents", "nt", "cnn", "cnn_gap_2conv_N64_16x16x3_ntk")]),
    "myrtle": (("infinite-width NTK of Myrtle-5 (2 x [Conv2d 3x3 same, ReLU], AvgPool2d(2), "
               "[Conv2d, ReLU], AvgPool2d(2), [Conv2d, ReLU], 3 x AvgPool2d(2), Flatten, "
               "Linear; w_std=sqrt(2), b_std=0), CIFAR-shaped 3 x 32 x 32 float32, "
               "k(x1, x2) with 8 x 8 images; time per kernel entry"), []),
    "entk": (("empirical NTK, full 10 x 10 per pair, MLP 100 -> 512 -> 512 -> 10 ReLU "
             "(nn.Sequential), x: 128 x 100 float32, method='auto'"),
             [("neural-tangents Jacobian contraction", "nt", "entk",
               "entk_mlp512x2_out10_N128_full_JACOBIAN_CONTRACTION"),
              ("neural-tangents NTK-vector products", "nt", "entk",
               "entk_mlp512x2_out10_N128_full_NTK_VECTOR_PRODUCTS"),
              ("torch.func Jacobian contraction", "torchfunc", "entk",
               "entk_torchfunc_jacobian_contraction"),
              ("torch.func NTK-vector products", "torchfunc", "entk",
               "entk_torchfunc_ntk_vector_products")]),
    "entk_cnn": (("empirical NTK traced over the 10 outputs, 3 x [Conv2d(32, 3, padding=1), "
                 "ReLU] + AdaptiveAvgPool2d(1) + Flatten + Linear(10), x: 64 images "
                 "3 x 16 x 16 float32, method='auto'"),
                 [("neural-tangents Jacobian contraction", "nt", "entk_cnn",
                   "entk_cnn3x32_gap_out10_N64_16x16x3_trace_JACOBIAN_CONTRACTION"),
                  ("neural-tangents NTK-vector products", "nt", "entk_cnn",
                   "entk_cnn3x32_gap_out10_N64_16x16x3_trace_NTK_VECTOR_PRODUCTS"),
                  ("torch.func Jacobian contraction", "torchfunc", "entk_cnn",
                   "entk_cnn_torchfunc_jacobian_contraction"),
                  ("torch.func NTK-vector products", "torchfunc", "entk_cnn",
                   "entk_cnn_torchfunc_ntk_vector_products")]),
    "predict": (("infinite NTK ensemble at t = inf, mean and covariance, MLP 2 x [Linear(512), "
                "ReLU] + Linear(1), 2000 train, 1000 test, 50 features, diag_reg 1e-4 "
                "(kernels included)"),
                [("neural-tangents", "nt", "predict", "ensemble_predict_ntk_cov_Ntr2000_Nte1000")]),
    "predict_20k": (("gradient_descent_mse on a precomputed 20000 x 20000 NTK (fc MLP, 20 "
                    "features), 10 outputs, train outputs at 50 times in one call (one "
                    "eigendecomposition); the kernel's own time is not included"), []),
    "entk_1024": (("empirical NTK, full 10 x 10 per pair, the entk MLP on 1024 inputs "
                  "(the result alone is 419 MB); target: peak memory within 4 GB"), []),
    "cnn_dask": (("the cnn workload's NTK with nk.kernel_matrix on a 2-worker "
                 "distributed.LocalCluster (1 thread each), against 1 worker (1 thread); "
                 "clusters started before timing; target: 2 workers at least 1.7x faster"), []),
    "large_n": (("kernel regression past memory: FALKON (ntkit.solvers.nystrom_krr) with the "
                "NTK of 2 x [Linear(512, w_std=1.5, b_std=0.1), ReLU] + Linear(1), float32 "
                "kernels, float64 algebra, diag_reg 0.1, on N synthetic points in 20 dimensions "
                "(sin(z1) + z1 z2 / 2 of two projections z, + noise 0.1; "
                "N = NTKIT_LARGE_N, default 1,000,000; centres "
                "NTKIT_LARGE_M, default 4000, K_nm recomputed every iteration); time = fit + "
                "predict on 10,000 test points; optional: error vs M, random features vs D, "
                "Nystrom features in one streamed pass (NTKIT_LARGE_NYSTROM), "
                "LocalCluster 1 vs 2 workers (benchmarks/large_n.py); "
                "target: 30 min, 8 GB, error below the exact 20,000-point solve's"), []),
    "sk_ntk": (("scikit-ntk's kernel: ntkit.sklearn.NeuralTangentKernel(depth=3, bias=0.5) "
               "with eval_gradient=True (what GaussianProcessRegressor.fit calls), x: 300 x 20 "
               "float64; best of 30 calls; target: no slower than scikit-ntk"),
               [("scikit-ntk", "skntk", "--skntk-peer", "sk_ntk_N300_d20_L3_grad")]),
    # "ntx": neural-tangents on benchmarks/nt_extra_bench.py (the same workloads, NT layout)
    "graph": (("graph NTK (Du et al. 2019): 200 graphs of 30 nodes, 8 features, per-example "
               "dense random patterns (p = 0.2, self loops), 2 x [Conv1d(64, 1, w_std=1.4, "
               "b_std=0.1) over channels, ReLU, Aggregate()] + GlobalSumPool + Linear(1), "
               "float32, NNGP and NTK k(x, x); target: at most 0.3x neural-tangents"),
              [("neural-tangents", "ntx", "graph", "graph_gcn2_N200_V30_ntk")]),
    "conv_transpose": (("transposed convolution: ConvTranspose2d(64, 3, stride=2, "
                        "padding='same', w_std=1.4, b_std=0.1) 8x8 -> 16x16, ReLU, Conv2d(64, "
                        "3, padding='same'), ReLU, Flatten, Linear(1); 64 images 3 x 8 x 8 "
                        "float32, NNGP and NTK k(x, x); target: at most 0.2x neural-tangents"),
                       [("neural-tangents", "ntx", "conv_transpose",
                         "conv_transpose_N64_8x8x3_s2_ntk")]),
    "conv_local": (("unshared convolution: Conv2d(64, 3, padding='same', w_std=1.4, b_std=0.1), "
                    "ReLU, LocallyConnected2d(64, 3, padding='same'), ReLU, Flatten, "
                    "Linear(1); 64 images 3 x 16 x 16 float32, NNGP and NTK k(x, x); target: "
                    "at most 0.2x neural-tangents"),
                   [("neural-tangents", "ntx", "conv_local", "conv_local_N64_16x16x3_ntk")]),
    "conv_transpose_gap": (("the conv_transpose workload with GlobalAvgPool instead of Flatten "
                            "(every pair of positions, as the cnn workload); target: at most "
                            "0.2x neural-tangents"),
                           [("neural-tangents", "ntx", "conv_transpose_gap",
                             "conv_transpose_gap_N64_8x8x3_s2_ntk")]),
    "conv_local_gap": (("the conv_local workload with GlobalAvgPool instead of Flatten (every "
                        "pair of positions into the first layer, as the cnn workload); target: "
                        "at most 0.2x neural-tangents"),
                       [("neural-tangents", "ntx", "conv_local_gap",
                         "conv_local_gap_N64_16x16x3_ntk")]),
    "finite_width": (("leading-order 1/width corrections (nk.finite_width: NNGP/NTK variance, "
                      "mean shifts, kurtosis) of 4 x [Linear(w_std=1.4, b_std=0.1), ReLU] + "
                      "Linear(1) at width 512, x: 256 x 20, all 256 x 256 entries, float64; "
                      "target: seconds, memory linear in the entries"), []),
    "finite_width_erf": (("the same with Erf (a smooth activation: split Gauss-Legendre "
                          "rule, Price's theorem), x: 64 x 20, all 64 x 64 entries; time "
                          "linear in the entries"), []),
    "rnn": (("recurrent NTK: RNN(256, ReLU, w_std=1, u_std=1, b_std=0.1, num_layers=2, "
             "readout='last') + Linear(1), 256 sequences of length 32 with 8 channels, float64, "
             "NNGP and NTK k(x, x); peer: the same recursion written plainly in NumPy as "
             "research code does (loops over all step pairs (t, t'), NumPy over the 256 x 256 "
             "sequence pairs); target: under 10 s, at most 0.1x the peer"),
            [("NumPy step-pair loops", "rnnpy", "--rnn-peer", "rnn_numpy_N256_L32_2layers")]),
    "entk_vit": (("empirical NTK, full 10 x 10 per pair, 2-layer ViT of width 64 (Conv2d 4x4 "
                 "patches of 3 x 16 x 16, class token, 2 x nn.TransformerEncoderLayer(64, 4, "
                 "128), Linear(10)), 16 images float32, method='auto' (interleaved medians "
                 "of every method: benchmarks/entk_attention.py)"),
                 [("torch.func Jacobian contraction", "entkattn", "--tutorial-peer=entk_vit",
                   "entk_vit_torchfunc_jacobian_contraction")]),
    "entk_bert": (("empirical NTK, full 2 x 2 per pair, tiny BERT (Embedding(1000, 64) + "
                  "learned positions, 2 x nn.TransformerEncoderLayer(64, 4, 256, gelu), [CLS] "
                  "readout Linear(2)), 16 sequences of 16 token ids, float32, method='auto'"),
                  [("torch.func Jacobian contraction", "entkattn", "--tutorial-peer=entk_bert",
                    "entk_bert_torchfunc_jacobian_contraction")]),
    "transformer": (("2-block post-LN encoder on token ids: Embedding(64, 100, learned "
                     "positions), 2 x encoder_block(64, 4 heads, d_ff 128) with softmax "
                     "MultiheadAttention at 1/sqrt(d_head) (sampled logits, n_samples=64), "
                     "mean readout, Linear(1); 64 sequences of 16 tokens, float32, NNGP and "
                     "NTK k(x, x); no peer (neural-tangents refuses this scaling); target: "
                     "<= 60 s and 2 GB at relative numerical error <= 1e-2"), []),
}


def transformer_case(baseline: float) -> dict:
    """The ``transformer`` workload: time of one kernel, and the numerical error of the
    sampled attention (spread of 3 replicates on the first 16 sequences) as a note."""
    import torch

    import ntkit as nk
    from ntkit.layers import encoder, readout

    ids = torch.randint(0, 100, (64, 16), generator=torch.Generator().manual_seed(0))

    def net():
        return nk.Sequential(nk.Embedding(64, 100, pos_emb="learned"),
                             encoder(2, 64, 4, 128, n_samples=64), readout("mean"),
                             nk.Linear(1))

    seconds = _best_of(lambda: net().kernel(ids), calls=1)
    rel = nk.numerical_error(net(), ids[:16], replicates=3).relative()
    return {"seconds": seconds, "baseline_mb": baseline, "entries": ids.shape[0] ** 2,
            "notes": f"reported numerical error (max over max entry): NNGP {rel[0]:.1e}, "
                     f"NTK {rel[1]:.1e}"}


def _rnn_inputs():
    import numpy as np

    return np.random.default_rng(0).standard_normal((256, 8, 32))


def rnn_case(baseline: float) -> dict:
    """The ``rnn`` workload on ntkit's side."""
    import torch

    import ntkit as nk

    x = torch.from_numpy(_rnn_inputs())
    net = nk.Sequential(nk.RNN(256, nk.ReLU(), w_std=1.0, u_std=1.0, b_std=0.1, num_layers=2,
                               readout="last"), nk.Linear(1))
    return {"seconds": _best_of(lambda: net.kernel(x), calls=3), "baseline_mb": baseline,
            "entries": x.shape[0] ** 2}


def _rnn_numpy_kernel(x):
    """The peer: the recurrent NTK recursion (Alemohammad et al. 2021) for a ReLU RNN in
    plain NumPy, one step pair (t, t') at a time over all pairs, as research code does."""
    import numpy as np

    n, c, steps = x.shape
    w2, u2, b2 = 1.0, 1.0, 0.01
    kin = [[x[:, :, t] @ x[:, :, s].T / c for s in range(steps)] for t in range(steps)]
    tin = [[np.zeros((n, n)) for _ in range(steps)] for _ in range(steps)]
    qin = [np.einsum("nc,nc->n", x[:, :, t], x[:, :, t]) / c for t in range(steps)]
    for _ in range(2):
        q, prev = [], np.zeros(n)
        for t in range(steps):
            q.append(w2 * prev + u2 * qin[t] + b2)
            prev = q[-1] / 2
        e = [[None] * steps for _ in range(steps)]
        th = [[None] * steps for _ in range(steps)]
        for t in range(steps):
            for s in range(steps):
                pe = e[t - 1][s - 1] if t and s else 0.0
                pth = th[t - 1][s - 1] if t and s else 0.0
                sig = w2 * pe + u2 * kin[t][s] + b2
                theta = sig + u2 * tin[t][s] + w2 * pth
                norm = np.sqrt(q[t][:, None] * q[s][None, :])
                cos = np.clip(sig / norm, -1.0, 1.0)
                ang = np.arccos(cos)
                e[t][s] = norm / (2 * np.pi) * (np.sin(ang) + (np.pi - ang) * cos)
                th[t][s] = (np.pi - ang) / (2 * np.pi) * theta
        kin, tin, qin = e, th, [qq / 2 for qq in q]
    nngp = kin[-1][-1]
    return nngp, nngp + tin[-1][-1]  # + Linear(1), w_std=1, b_std=0


def _rnn_peer() -> None:
    """The ``rnn`` workload's peer (``run.py --rnn-peer``)."""
    x = _rnn_inputs()
    print(json.dumps({"case": "rnn_numpy_N256_L32_2layers",
                      "seconds": _best_of(lambda: _rnn_numpy_kernel(x), calls=1)}))


def extra_case(case: str):
    """``(run, entries)`` of the graph / transposed / unshared convolution workloads
    (the same as benchmarks/nt_extra_bench.py's)."""
    import torch

    import ntkit as nk

    gen = torch.Generator().manual_seed(0)
    if case == "graph":
        n, v, c = 200, 30, 8
        x = torch.randn(n, c, v, generator=gen)
        a = (torch.rand(n, v, v, generator=gen) < 0.2).float() + torch.eye(v)
        conv = lambda: nk.Conv1d(64, 1, w_std=1.4, b_std=0.1)
        net = nk.Sequential(conv(), nk.ReLU(), nk.Aggregate(), conv(), nk.ReLU(), nk.Aggregate(),
                            nk.GlobalSumPool(), nk.Linear(1))
        return (lambda: net.kernel(x, pattern=a)), n * n
    readout = nk.GlobalAvgPool() if case.endswith("_gap") else nk.Flatten()
    if case.startswith("conv_transpose"):
        x = torch.randn(64, 3, 8, 8, generator=gen)
        net = nk.Sequential(
            nk.ConvTranspose2d(64, 3, stride=2, padding="same", w_std=1.4, b_std=0.1), nk.ReLU(),
            nk.Conv2d(64, 3, padding="same", w_std=1.4, b_std=0.1), nk.ReLU(), readout,
            nk.Linear(1))
        return (lambda: net.kernel(x)), 64 * 64
    x = torch.randn(64, 3, 16, 16, generator=gen)
    net = nk.Sequential(
        nk.Conv2d(64, 3, padding="same", w_std=1.4, b_std=0.1), nk.ReLU(),
        nk.LocallyConnected2d(64, 3, padding="same", w_std=1.4, b_std=0.1), nk.ReLU(),
        readout, nk.Linear(1))
    return (lambda: net.kernel(x)), 64 * 64


def finite_width_case(baseline: float, reps: int, smooth: bool = False) -> dict:
    """The ``finite_width`` workload: one timed `nk.finite_width` call (no warm-up: the
    first call is the one a user waits for); ``smooth``: Erf on 64 inputs."""
    import torch

    import ntkit as nk

    x = torch.randn(64 if smooth else 256, 20, generator=torch.Generator().manual_seed(0))
    act = nk.Erf if smooth else nk.ReLU
    block = lambda: (nk.Linear(512, w_std=1.4, b_std=0.1), act())
    net = nk.Sequential(*block(), *block(), *block(), *block(), nk.Linear(1, 1.4, 0.1))
    t0 = time.perf_counter()
    nk.finite_width(net, x, width=512)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "baseline_mb": baseline, "entries": x.shape[0] ** 2}


def entk_models(case: str):
    """The model and inputs of the empirical-NTK workloads, as torchfunc_bench.py makes them."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if case in ("entk", "entk_1024"):
        model = nn.Sequential(nn.Linear(100, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))
        return model, torch.randn(128 if case == "entk" else 1024, 100, generator=gen), "full"
    conv = lambda i: nn.Conv2d(i, 32, 3, padding=1)
    model = nn.Sequential(conv(3), nn.ReLU(), conv(32), nn.ReLU(), conv(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return model, torch.randn(64, 3, 16, 16, generator=gen), "trace"


def myrtle5() -> object:
    """Myrtle-5 (Shankar et al. 2020) as in neural-tangents' example."""
    import math

    import ntkit as nk

    def block():
        return [nk.Conv2d(1, 3, padding="same", w_std=math.sqrt(2), b_std=0.0), nk.ReLU()]

    return nk.Sequential(*block(), *block(), nk.AvgPool2d(2), *block(), nk.AvgPool2d(2),
                         *block(), nk.AvgPool2d(2), nk.AvgPool2d(2), nk.AvgPool2d(2),
                         nk.Flatten(), nk.Linear(1, w_std=1.0))


def _best_of(fn, calls: int = 30) -> float:
    """The fastest of ``calls`` timed calls of ``fn`` after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _sk_ntk_inputs():
    import numpy as np

    return np.random.default_rng(0).standard_normal((300, 20))


def sk_ntk_case(baseline: float) -> dict:
    """The ``sk_ntk`` workload on ntkit's side."""
    from ntkit.sklearn import NeuralTangentKernel

    x, kern = _sk_ntk_inputs(), NeuralTangentKernel(depth=3, bias=0.5)
    return {"seconds": _best_of(lambda: kern(x, eval_gradient=True)), "baseline_mb": baseline,
            "entries": x.shape[0] ** 2}


def _sk_ntk_peer() -> None:
    """The ``sk_ntk`` workload on scikit-ntk (``run.py --skntk-peer``, run as a peer)."""
    from skntk import NeuralTangentKernel

    x, kern = _sk_ntk_inputs(), NeuralTangentKernel(depth=3, bias=0.5)
    print(json.dumps({"case": "sk_ntk_N300_d20_L3_grad",
                      "seconds": _best_of(lambda: kern(x, eval_gradient=True))}))


def cnn_dask_case(baseline: float, reps: int) -> dict:
    """The ``cnn`` workload's kernel with `nk.kernel_matrix` on a LocalCluster of 2 workers
    (1 thread each) against one of 1 worker; both clusters are started (and warmed up)
    before timing. Seconds are the 2 workers' best of ``reps``."""
    import dask
    import distributed
    import torch

    import ntkit as nk

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=gen)
    conv = lambda: nk.Conv2d(64, 3, padding="same", w_std=1.4, b_std=0.1)
    net = nk.Sequential(conv(), nk.ReLU(), conv(), nk.ReLU(), nk.GlobalAvgPool(), nk.Linear(1))
    # the workers' environment nk.kernel_matrix(n_workers=...) gives its own clusters
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 32 << 20}):
        clients = {n: distributed.Client(distributed.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"})) for n in (1, 2)}
    best, cpu = {}, {}
    for n, client in clients.items():
        want = nk.kernel_matrix(net, x, client=client)  # warm-up
        assert (want - net.kernel(x).ntk).abs().max() < 1e-4
        times = []
        for _ in range(reps):
            before = client.run(time.process_time)
            t0 = time.perf_counter()
            nk.kernel_matrix(net, x, client=client)
            times.append(time.perf_counter() - t0)
            after = client.run(time.process_time)
            cpu[n] = sorted(round(after[w] - before[w], 2) for w in after)
        best[n] = min(times)
        client.close()
        client.cluster.close()
    notes = (f"1 worker {best[1]:.2f} s, 2 workers {best[2]:.2f} s: {best[1] / best[2]:.2f}x "
             f"faster. CPU s per worker in the last run: {cpu[1]} vs {cpu[2]}, i.e. "
             f"{cpu[1][0] / max(cpu[2]):.2f}x with a free core per worker (on shared cores the "
             f"wall-clock ratio measures the neighbours too)")
    print(notes, file=sys.stderr)
    return {"seconds": best[2], "baseline_mb": baseline, "entries": x.shape[0] ** 2,
            "notes": notes}


def large_n_case(baseline: float) -> dict:
    """The ``large_n`` workload, run once (no warm-up: it is the 30-minute case); see
    benchmarks/large_n.py for what it measures and its environment variables."""
    import large_n

    return large_n.run(baseline, _peak_rss_mb)


# ----------------------------------------------------------------- ntkit side
def _ntkit_case(case: str, reps: int) -> dict:
    import torch

    import ntkit as nk

    baseline = _peak_rss_mb()  # after imports, before data: what the library itself costs
    if case == "fc":
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4000, 784, generator=gen)
        net = nk.Sequential(
            nk.Repeat(nk.Sequential(nk.Linear(512, w_std=1.4, b_std=0.1), nk.ReLU()), 3),
            nk.Linear(1),
        )
        run = lambda: net.kernel(x)
        entries = x.shape[0] ** 2
    elif case == "cnn":
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, 16, 16, generator=gen)
        conv = lambda: nk.Conv2d(64, 3, padding="same", w_std=1.4, b_std=0.1)
        net = nk.Sequential(conv(), nk.ReLU(), conv(), nk.ReLU(), nk.GlobalAvgPool(),
                            nk.Linear(1))
        run = lambda: net.kernel(x)
        entries = x.shape[0] ** 2
    elif case == "cnn_dask":
        return cnn_dask_case(baseline, reps)
    elif case == "myrtle":
        gen = torch.Generator().manual_seed(0)
        x1 = torch.randn(8, 3, 32, 32, generator=gen)
        x2 = torch.randn(8, 3, 32, 32, generator=gen)
        net = myrtle5()
        run = lambda: net.kernel(x1, x2)
        entries = x1.shape[0] * x2.shape[0]
    elif case == "predict":
        from ntkit import predict

        gen = torch.Generator().manual_seed(0)
        xtr, ytr = torch.randn(2000, 50, generator=gen), torch.randn(2000, 1, generator=gen)
        xte = torch.randn(1000, 50, generator=gen)
        net = nk.Sequential(nk.Linear(512), nk.ReLU(), nk.Linear(512), nk.ReLU(), nk.Linear(1))

        def run():
            pred = predict.gradient_descent_mse_ensemble(net, xtr, ytr, diag_reg=1e-4)
            return pred(xte, None, get="ntk", compute_cov=True)
        entries = 2000 * 1000
    elif case == "predict_20k":
        from ntkit import predict

        gen = torch.Generator().manual_seed(0)
        xtr, ytr = torch.randn(20000, 20, generator=gen), torch.randn(20000, 10, generator=gen)
        net = nk.Sequential(nk.Linear(512), nk.ReLU(), nk.Linear(512), nk.ReLU(), nk.Linear(1))
        k = net.kernel(xtr).ntk
        grid = torch.logspace(-1, 4, 50)  # not `times`: the timing loop below rebinds that

        def run():
            p = predict.gradient_descent_mse(k, ytr, diag_reg=1e-4)
            out = p(grid).train
            assert p.factorisations == 1 and out.shape == (50, 20000, 10)
            return out
        entries = 50 * 20000 * 10
    elif case == "finite_width":
        return finite_width_case(baseline, reps)
    elif case == "finite_width_erf":
        return finite_width_case(baseline, reps, smooth=True)
    elif case == "large_n":
        return large_n_case(baseline)
    elif case == "sk_ntk":
        return sk_ntk_case(baseline)
    elif case == "rnn":
        return rnn_case(baseline)
    elif case == "transformer":
        return transformer_case(baseline)
    elif case in ("graph", "conv_transpose", "conv_local", "conv_transpose_gap",
                  "conv_local_gap"):
        run, entries = extra_case(case)
    elif case in ("entk_vit", "entk_bert"):
        from entk_attention import models

        model, x, output = models(case)
        run = lambda: nk.empirical_ntk(model, x, output=output)
        entries = x.shape[0] ** 2
    elif case.startswith("entk"):
        model, x, output = entk_models(case)
        run = lambda: nk.empirical_ntk(model, x, output=output)
        entries = x.shape[0] ** 2
    else:
        raise KeyError(case)
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "baseline_mb": baseline, "entries": entries}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(case: str, reps: int) -> None:
    out = _ntkit_case(case, reps)
    out["peak_mb"] = _peak_rss_mb()
    print(json.dumps(out))


# ------------------------------------------------------------------ the peer
def _nt_python(arg: str | None) -> Path | None:
    for cand in (arg, os.environ.get("NT_PYTHON"), DEFAULT_NT_PYTHON):
        if cand and Path(cand).exists():
            return Path(cand)
    return None


def _peer_script(name: str) -> Path | None:
    for d in PEERS:
        if (d / name).exists():
            return d / name
    return None


def _run_peer(py: Path, script: Path, case: str, reps: int, *, nt: bool) -> dict | None:
    """Runs a peer script for one case under a wrapper that reports its peak RSS;
    returns {JSON case key: seconds or error text, "peak_mb": ..., "baseline_mb": ...}."""
    imports = "import jax, neural_tangents\n" if nt else "import torch\n"
    argv = [str(script), case] + (["--reps", str(reps)] if nt else [])
    wrapper = (
        "import runpy, sys, resource, json\n" + imports +
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024\n"
        f"sys.argv = {argv!r}\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "print(json.dumps({'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024,"
        " 'baseline_mb': base}))\n"
    )
    proc = subprocess.run([str(py), "-c", wrapper], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{script.name} failed on {case}:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            if "case" in item:
                result[item["case"]] = item.get("seconds", item.get("error", "failed"))
            else:
                result.update(item)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--nt-python", default=None)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skntk-peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rnn-peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.reps)
        return
    if args.skntk_peer:
        _sk_ntk_peer()
        return
    if args.rnn_peer:
        _rnn_peer()
        return

    runners = {}
    if not args.no_peer:
        nt_py, nt_script = _nt_python(args.nt_python), _peer_script("nt_bench.py")
        if nt_py and nt_script:
            runners["nt"] = (nt_py, nt_script)
        if nt_py:  # workloads nt_bench.py lacks (graph, conv_transpose, conv_local)
            runners["ntx"] = (nt_py, HERE / "nt_extra_bench.py")
        tf_script = _peer_script("torchfunc_bench.py")
        if tf_script:
            runners["torchfunc"] = (Path(sys.executable), tf_script)
        if importlib.util.find_spec("skntk") is not None:    # scikit-ntk: this script
            runners["skntk"] = (Path(sys.executable), Path(__file__))
        runners["rnnpy"] = (Path(sys.executable), Path(__file__))  # NumPy recursion: here
        runners["entkattn"] = (Path(sys.executable), HERE / "entk_attention.py")
    rows = []
    for case in args.cases:
        desc, peers = CASES[case]
        proc = subprocess.run([sys.executable, __file__, "--child", case, "--reps", str(args.reps)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"ntkit failed on {case}:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        ours = json.loads(proc.stdout.strip().splitlines()[-1])
        if ours.get("notes"):          # a case's own findings (e.g. large_n's errors)
            desc = f"{desc}; {ours['notes']}"
        row = {"case": case, "workload": desc, "ntkit_s": ours["seconds"],
               "ms_per_entry": 1e3 * ours["seconds"] / ours["entries"],
               "ntkit_peak_mb": ours["peak_mb"],
               "ntkit_work_mb": ours["peak_mb"] - ours["baseline_mb"], "peers": {}}
        runs: dict = {}
        for label, runner, peer_case, key in peers:
            if runner not in runners:
                continue
            if (runner, peer_case) not in runs:
                runs[runner, peer_case] = _run_peer(*runners[runner], peer_case, args.reps,
                                                    nt=runner in ("nt", "ntx"))
            got = runs[runner, peer_case]
            if got and key in got:
                row["peers"][label] = {"seconds": got[key], "peak_mb": got["peak_mb"],
                                       "work_mb": got["peak_mb"] - got["baseline_mb"]}
        timed = {k: v for k, v in row["peers"].items() if isinstance(v["seconds"], float)}
        if timed:
            best = min(timed, key=lambda k: timed[k]["seconds"])
            row.update(best_peer=best, best_s=timed[best]["seconds"],
                       ratio=ours["seconds"] / timed[best]["seconds"])
        rows.append(row)

    print("| case | ntkit s | best peer s | time ratio | ntkit peak MB (work) "
          "| best peer peak MB (work) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mine = f"{r['ntkit_peak_mb']:.0f} ({r['ntkit_work_mb']:.0f})"
        if "best_s" in r:
            p = r["peers"][r["best_peer"]]
            print(f"| {r['case']} | {r['ntkit_s']:.3f} | {r['best_s']:.3f} ({r['best_peer']}) "
                  f"| {r['ratio']:.3f}x | {mine} | {p['peak_mb']:.0f} ({p['work_mb']:.0f}) |")
        else:
            peer = "not installed" if CASES[r["case"]][1] else "no such workload"
            print(f"| {r['case']} | {r['ntkit_s']:.3f} | {peer} | - | {mine} | - |")
    print("\nPeak MB is the process's maximum resident set; (work) is that peak minus the "
          "resident set after importing the library, before the data is made.")
    for r in rows:
        print(f"- {r['case']}: {r['workload']} ({r['ms_per_entry']:.3g} ms per kernel entry)")
        for label, p in r["peers"].items():
            t = p["seconds"]
            shown = f"{t:.3f} s, ntkit at {r['ntkit_s'] / t:.4f}x" if isinstance(t, float) \
                else f"failed: {t}"
            print(f"  - {label}: {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
