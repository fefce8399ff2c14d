"""Issue 19's targets for ``ntkit.theory``: time and peak memory.

- ``curve``: a learning curve over 20 training sizes (10 to 600, log-spaced) from a pool
  of P = 5,000 points: the kernel (1-hidden-layer ReLU NTK, float64, 64 features) and
  `ntkit.theory.learning_curve`, ridgeless and with a ridge. Target: under 30 s on the
  2-core machine.
- ``nystrom``: `ntkit.theory.nystrom_spectrum` on a pool of P = 100,000 points (20
  features, m = 2,000 landmarks), then `eigenlearning`. Target: within 8 GB.

Each case runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own.
Reports the load average before and after (the machine is shared: a load above the core
count slows every timing) and the CPU seconds, which the load does not inflate. Usage::

    OMP_NUM_THREADS=2 python benchmarks/theory_bench.py [curve] [nystrom] [--pool P]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads: what the work costs
    whatever the load (on a quiet machine the wall time lies between this over the
    thread count and this)."""
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def curve_case(pool: int) -> dict:
    import torch

    import ntkit as nk
    from ntkit import theory as th

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(pool, 64, generator=gen, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    net = nk.Sequential(nk.Linear(512, w_std=1.5, b_std=0.1), nk.ReLU(),
                        nk.Linear(1, w_std=1.5, b_std=0.1))
    sizes = torch.logspace(1, torch.log10(torch.tensor(600.0)), 20).round().tolist()
    out = {"case": "curve", "pool": pool, "sizes": len(sizes)}
    c0, t0 = _cpu_s(), time.perf_counter()
    k = net.kernel(x).ntk
    out["kernel_s"] = time.perf_counter() - t0
    for ridge in (0.0, 1e-3):
        t1 = time.perf_counter()
        curve = th.learning_curve(k, y, sizes, ridge=ridge)
        out[f"curve_ridge{ridge:g}_s"] = time.perf_counter() - t1
        assert curve.test_mse.shape == (20,) and bool(torch.isfinite(curve.test_mse).all())
    out["total_s"] = time.perf_counter() - t0
    out["total_cpu_s"] = _cpu_s() - c0
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def nystrom_case(pool: int, landmarks: int = 2000) -> dict:
    import torch

    import ntkit as nk
    from ntkit import theory as th

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(pool, 20, generator=gen, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    net = nk.Sequential(nk.Linear(512, w_std=1.5, b_std=0.1), nk.ReLU(),
                        nk.Linear(1, w_std=1.5, b_std=0.1))
    c0, t0 = _cpu_s(), time.perf_counter()
    spec = th.nystrom_spectrum(net, x, y, landmarks=landmarks, generator=gen)
    curve = th.eigenlearning(spec, [20, 50, 100, 200], ridge=1e-3)
    assert bool(torch.isfinite(curve.test_mse).all())
    return {"case": "nystrom", "pool": pool, "landmarks": landmarks,
            "total_s": time.perf_counter() - t0, "total_cpu_s": _cpu_s() - c0,
            "peak_rss_mb": _peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=["curve"])
    parser.add_argument("--pool", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case = args.cases[0]
        out = (curve_case(args.pool or 5000) if case == "curve"
               else nystrom_case(args.pool or 100_000))
        print(json.dumps(out))
        return
    for case in args.cases:
        if case not in ("curve", "nystrom"):
            parser.error(f"unknown case {case!r}; choose curve or nystrom")
        load0 = os.getloadavg()[0]
        cmd = [sys.executable, __file__, case, "--child"]
        if args.pool:
            cmd += ["--pool", str(args.pool)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        out.update(load_before=load0, load_after=os.getloadavg()[0],
                   omp_num_threads=os.environ.get("OMP_NUM_THREADS"), cores=os.cpu_count())
        print(json.dumps(out))


if __name__ == "__main__":
    main()
