"""The random-features route of the ``large_n`` task: error, time and peak memory against D.

Ridge regression on ``D`` NTK random features (`ntkit.features.fit_ridge`: features of
8192 rows at a time in float32, ``Phi^T Phi`` and ``Phi^T y`` summed in float64, one
Cholesky solve) of all ``N`` training points of `large_n.task`, and on ``M`` Nystrom
features (`NystromFeatureMap`: Nystrom KRR, FALKON's estimator, in one pass), against
the exact solve (dense float64 Cholesky) on the first 20,000 of them, on the same test
set (``--exact``; the test set depends on ``N``, so compare rows of the same ``N``).

Each measurement runs in its own process (so its peak RSS is its own) and is appended
as one JSON line to ``--out`` as soon as it finishes, with the load average before and
after; a killed sweep keeps the rows it finished. Usage::

    OMP_NUM_THREADS=2 python benchmarks/large_n_rf.py --n 1000000 --d 1000,2000,4000 \\
        --nystrom 3000 --exact --out benchmarks/large_n_rf_results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(n: int, what: str) -> dict:
    """One measurement in this process: ``what`` is a feature count ``D`` (random
    features), ``"nystromM"`` (``M`` Nystrom centres) or ``"exact"``."""
    import torch

    sys.path.insert(0, str(HERE))
    import large_n

    x, y, xt, ft, net = large_n.task(n)
    base = _peak_mb()
    t0 = time.perf_counter()
    if what == "exact":
        import numpy as np
        import scipy.linalg

        from ntkit import solvers

        kfn = solvers.kernel_function(net, "ntk")
        m = min(n, 20_000)
        xs, ys = x[:m], y[:m]
        k = np.empty((m, m))
        for i in range(0, m, 2000):
            k[i:i + 2000] = kfn(xs[i:i + 2000], xs).double().numpy()
        k[np.diag_indices(m)] += large_n.DIAG_REG * float(k.diagonal().mean())
        factor = scipy.linalg.cho_factor(k.T, lower=True, overwrite_a=True, check_finite=False)
        alpha = torch.from_numpy(scipy.linalg.cho_solve(factor, ys.double().numpy()))
        del k, factor
        pred = torch.cat([kfn(xt[i:i + 1000], xs).double() @ alpha
                          for i in range(0, xt.shape[0], 1000)])
        fit_s = time.perf_counter() - t0
        record = {"route": f"exact {m}", "n": n, "subset": m}   # n: the test set's draw
    elif what.startswith("nystrom"):
        from ntkit.features import NystromFeatureMap, fit_ridge

        m = int(what[len("nystrom"):])
        fmap = NystromFeatureMap.from_data(net, x, n_centers=m,
                                           generator=torch.Generator().manual_seed(1))
        model = fit_ridge(fmap, x, y, diag_reg=large_n.DIAG_REG)
        fit_s = time.perf_counter() - t0
        pred = model.predict(xt)
        record = {"route": "nystrom features", "n": n, "m": m}
    else:
        from ntkit.features import fit_ridge

        d = int(what)
        model = fit_ridge(net, x, y, n_features=d, diag_reg=large_n.DIAG_REG,
                          generator=torch.Generator().manual_seed(2))
        fit_s = time.perf_counter() - t0
        pred = model.predict(xt)
        record = {"route": "random features", "n": n, "d": d}
    total_s = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record.update(cpu_s=round(usage.ru_utime + usage.ru_stime, 1))   # all threads' CPU time
    record.update(error=round(large_n.rel(pred, ft), 4), fit_s=round(fit_s, 1),
                  total_s=round(total_s, 1), peak_mb=round(_peak_mb()),
                  data_mb=round(base), threads=torch.get_num_threads())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="training points")
    parser.add_argument("--d", default="1000,2000,4000", help="feature counts, comma-separated")
    parser.add_argument("--nystrom", default="", help="Nystrom centre counts M, comma-separated")
    parser.add_argument("--exact", action="store_true", help="also the exact 20k solve")
    parser.add_argument("--out", default=str(HERE / "large_n_rf_results.jsonl"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.n, args.one)))
        return
    jobs = [v for v in args.d.split(",") if v.strip()] + \
        [f"nystrom{v}" for v in args.nystrom.split(",") if v.strip()] + \
        (["exact"] if args.exact else [])
    for what in jobs:
        load = os.getloadavg()
        t0 = time.time()
        done = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--one", what],
                              check=False, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            record = {"job": what, "n": args.n, "failed": done.returncode}
        else:
            record = json.loads(done.stdout.strip().splitlines()[-1])
        record.update(load_before=[round(v, 2) for v in load],
                      load_after=[round(v, 2) for v in os.getloadavg()],
                      started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                      omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
        line = json.dumps(record)
        print(line, flush=True)
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
