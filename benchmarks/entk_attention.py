"""The empirical NTK of small attention models: ntkit against the torch.func tutorial.

    OMP_NUM_THREADS=1 python benchmarks/entk_attention.py [entk_vit entk_bert] [--reps 9]

Workloads (float32, N = 16 inputs; each timed for four kernels: ``output="full"``
(every output pair, the tutorial's default) and ``"trace"``, each ``Theta(x, x)`` and
``Theta(x1, x2)`` with 16 more inputs, the tutorial's ``x_train, x_test``):

- ``entk_vit``: a 2-layer ViT of width 64: 4 x 4 patches of 3 x 16 x 16 images embedded
  by a strided ``Conv2d``, a class token and learned positions (17 tokens), 2 x
  ``nn.TransformerEncoderLayer(64, 4 heads, d_ff 128, batch_first)``, LayerNorm, the class
  token read out by ``Linear(64, 10)``;
- ``entk_bert``: a tiny BERT: ``nn.Embedding(1000, 64)`` token ids plus learned
  positions (16 tokens, the first a [CLS] id), LayerNorm, 2 x
  ``nn.TransformerEncoderLayer(64, 4 heads, d_ff 256, GELU, batch_first)``, the [CLS]
  token's features read out by ``Linear(64, 2)``.

The peer is the Jacobian contraction of the torch.func tutorial
(https://pytorch.org/tutorials/intermediate/neural_tangent_kernels.html): per-example
Jacobians by ``vmap(jacrev)`` of ``functional_call``, contracted with ``einsum``, written
as that page writes it. Each method (ntkit ``method="auto"`` and every explicit method,
and the peer) is timed in the same process, round-robin over ``--reps`` repetitions
after one warm-up (so that load from other jobs hits every method alike), and reported
as the median; the ratio to the peer is the ratio of medians. All results are checked
equal (to 1e-4 of the largest entry) before timing. Peak memory (the "full x,x" kernel
only) is the resident-set growth of one call in a fresh subprocess per method.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

N = 16
METHODS = ("auto", "jacobian", "structured", "vector_products")


def models(case: str):
    """``(model, x, output)`` of a workload, in eval mode, seeded."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if case == "entk_vit":
        model = _ViT()
        x = torch.randn(N, 3, 16, 16, generator=gen)
    elif case == "entk_bert":
        model = _BERT()
        x = torch.randint(1, 1000, (N, 16), generator=gen)
        x[:, 0] = 0                                   # the [CLS] id
    else:
        raise KeyError(f"unknown case {case!r}; choose entk_vit or entk_bert.")
    assert isinstance(model, nn.Module)
    return model.eval(), x, "full"


def _encoder(width: int, heads: int, ff: int, activation: str):
    from torch import nn

    layer = lambda: nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0,
                                               activation=activation, batch_first=True)
    return nn.Sequential(layer(), layer())


def _module_classes():
    import torch
    from torch import nn

    class ViT(nn.Module):
        """Patch embedding, class token, learned positions, 2 encoder layers, class readout."""

        def __init__(self, width: int = 64, patch: int = 4, image: int = 16,
                     n_out: int = 10):
            super().__init__()
            self.embed = nn.Conv2d(3, width, patch, stride=patch)
            self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))
            self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, width))
            self.blocks = _encoder(width, 4, 2 * width, "relu")
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, n_out)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)              # (N, P, C)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
            return self.head(self.norm(self.blocks(t))[:, 0])

    class BERT(nn.Module):
        """Token and position embeddings, LayerNorm, 2 encoder layers, [CLS] readout."""

        def __init__(self, vocab: int = 1000, width: int = 64, length: int = 16,
                     n_out: int = 2):
            super().__init__()
            self.tokens = nn.Embedding(vocab, width)
            self.pos = nn.Parameter(0.02 * torch.randn(1, length, width))
            self.norm = nn.LayerNorm(width)
            self.blocks = _encoder(width, 4, 4 * width, "gelu")
            self.head = nn.Linear(width, n_out)

        def forward(self, ids):
            t = self.norm(self.tokens(ids) + self.pos[:, :ids.shape[1]])
            return self.head(self.blocks(t)[:, 0])

    return ViT, BERT


def _ViT():
    return _module_classes()[0]()


def _BERT():
    return _module_classes()[1]()


def tutorial_ntk(model, x1, x2, output: str = "full"):
    """The torch.func tutorial's Jacobian contraction: ``(N1, N2, O, O)`` for "full",
    ``(N1, N2)`` for "trace" (the tutorial's ``compute='trace'``)."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    einsum_expr = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM"}[output]
    result = torch.stack([torch.einsum(einsum_expr, j1, j2) for j1, j2 in zip(jac1, jac2)])
    return result.sum(0)


def second_batch(case: str, x):
    """Another 16 inputs of the workload (the tutorial's ``x_test``)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    if x.is_floating_point():
        return torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x2 = torch.randint(1, 1000, x.shape, generator=gen)
    x2[:, 0] = 0
    return x2


def runners(model, x, output: str, methods=METHODS, x2=None) -> dict:
    """``{label: () -> kernel}``: ntkit per method, and the peer; ``Theta(x, x)`` or,
    given ``x2``, ``Theta(x, x2)``."""
    import ntkit as nk

    out = {f"ntkit {m}": (lambda m=m: nk.empirical_ntk(model, x, x2, output=output, method=m))
           for m in methods}
    out["torch.func tutorial"] = lambda: tutorial_ntk(model, x, x if x2 is None else x2,
                                                      output)
    return out


def check_equal(results: dict) -> float:
    """The largest deviation from the peer, relative to its largest entry; raises past
    1e-4 (float32 sums in different orders)."""
    ref = results["torch.func tutorial"]
    scale = float(ref.abs().max())
    worst = 0.0
    for label, k in results.items():
        err = float((k - ref).abs().max()) / scale
        if err > 1e-4:
            raise AssertionError(f"{label} differs from the peer by {err:.2e} of its max.")
        worst = max(worst, err)
    return worst


VARIANTS = ("full x,x", "full x1,x2", "trace x,x", "trace x1,x2")


def timed(case: str, variant: str, reps: int) -> dict:
    """Median seconds per method for one variant (output, and ``Theta(x, x)`` or
    ``Theta(x1, x2)``), interleaved, after a warm-up and an equality check."""
    from ntkit.empirical._choice import chosen_method

    model, x, _ = models(case)
    output, pair = variant.split()
    x2 = None if pair == "x,x" else second_batch(case, x)
    run = runners(model, x, output, x2=x2)
    results = {label: fn() for label, fn in run.items()}           # warm-up and check
    worst = check_equal(results)
    times: dict[str, list[float]] = {label: [] for label in run}
    for r in range(reps):
        order = list(run) if r % 2 == 0 else list(run)[::-1]
        for label in order:
            t0 = time.perf_counter()
            run[label]()
            times[label].append(time.perf_counter() - t0)
    return {"case": case, "variant": variant,
            "params": sum(p.numel() for p in model.parameters()),
            "chosen": chosen_method(model, x, x2, output=output),
            "max_rel_dev": worst, "reps": reps,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "min_s": {k: min(v) for k, v in times.items()}}


def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def _peak_child(case: str, label: str) -> None:
    """One call of one method after a warm-up on 2 inputs: the growth of the peak
    resident set over the resident set before the call (Linux: the peak is reset
    through /proc/self/clear_refs, so that importing torch does not mask it)."""
    model, x, output = models(case)
    runners(model, x[:2], output)[label]()
    run = runners(model, x, output)[label]
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss_mb("VmRSS")
    run()
    print(json.dumps({"peak_mb": _rss_mb("VmHWM"), "work_mb": _rss_mb("VmHWM") - base}))


def peak_memory(case: str) -> dict:
    """``{label: MB of resident-set growth of one call}``, one subprocess per method."""
    labels = [f"ntkit {m}" for m in METHODS] + ["torch.func tutorial"]
    out = {}
    for label in labels:
        proc = subprocess.run([sys.executable, __file__, "--peak", case, label],
                              capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        out[label] = json.loads(lines[-1])["work_mb"] if lines else float("nan")
    return out


def _tutorial_peer(case: str, reps: int) -> None:
    """The peer alone, as benchmarks/run.py runs peers: best of ``reps`` after a warm-up,
    one JSON line ``{"case": ..., "seconds": ...}``."""
    model, x, output = models(case)
    tutorial_ntk(model, x, x, output)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        tutorial_ntk(model, x, x, output)
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"case": f"{case}_torchfunc_jacobian_contraction", "seconds": best}))


def table(rows: list[dict]) -> str:
    """A Markdown table: median ms per method and the ratio to the peer."""
    lines = ["| case | kernel | method | median ms | min ms | / peer (median) | work MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = r["median_s"]["torch.func tutorial"]
        for label, s in r["median_s"].items():
            shown = label + (f" (-> {r['chosen']})" if label == "ntkit auto" else "")
            mb = r.get("work_mb", {}).get(label)
            lines.append(f"| {r['case']} | {r['variant']} | {shown} | {1e3 * s:.1f} | "
                         f"{1e3 * r['min_s'][label]:.1f} | {s / peer:.2f}x | "
                         f"{'-' if mb is None else f'{mb:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=["entk_vit", "entk_bert"])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every method (default 1: quiet on a shared "
                             "machine)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS),
                        help=f"kernels to time, of {VARIANTS}")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--peak", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tutorial-peer", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.tutorial_peer:      # benchmarks/run.py's peer runner: torch's default threads
        _tutorial_peer(args.tutorial_peer, args.reps)
        return
    torch.set_num_threads(args.threads)
    if args.peak:
        _peak_child(*args.peak)
        return
    rows = []
    for case in args.cases:
        for variant in args.variants:
            row = timed(case, variant, args.reps)
            if not args.no_memory and variant == "full x,x":
                row["work_mb"] = peak_memory(case)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
