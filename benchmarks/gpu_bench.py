"""The Python side of benchmarks/gpu_check.sh: one benchmark step per call, and the report.

    python benchmarks/gpu_bench.py STEP --out DIR [--device cuda|cpu] [--size full|tiny]
    python benchmarks/gpu_bench.py report --out DIR

Steps (each writes ``DIR/<step>.json``; gpu_check.sh runs each in its own process
under its own timeout, so one hang or crash costs only that step):

- ``env``: torch, CUDA, the device, and which optional packages import.
- ``myrtle``: the infinite-width NTK of Myrtle-5 (benchmarks/run.py's ``myrtle5``),
  3 x 32 x 32 images, ``k(x1, x2)``; time per kernel entry.
- ``cnn_gap21``: neural-tangents' 21-layer CNN with global average pooling (21 x
  [Conv2d 3x3 'same', ReLU], GlobalAvgPool, Linear; Arora et al. 2019, "On Exact
  Computation with an Infinitely Wide Neural Net", the CNTK-GAP of depth 21; Novak
  et al. 2020 time it per kernel entry), 3 x 32 x 32 images; time per entry.
- ``entk``: the empirical NTK workloads of benchmarks/run.py (``entk_models``:
  an MLP and a CNN).
- ``predict``: benchmarks/run.py's predict workload (infinite NTK ensemble at
  t = inf, mean and covariance, 2000 train / 1000 test).

Every timed result is also checked against a second computation: the same entries
on the CPU in float64 (the relative error is reported; above `TOLERANCE` the row
says MISMATCH). ``report`` reads the steps' JSON, ``steps.tsv`` (exit status and
seconds of each step, written by gpu_check.sh) and the raw pytest output, and
writes ``DIR/report.md``. Needs only torch, numpy and ntkit (``PYTHONPATH=src``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import platform
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Steps, in the order of the report, with their section titles.
STEPS = {
    "env": "Environment",
    "myrtle": "Myrtle-5 infinite-width NTK",
    "cnn_gap21": "CNN-GAP, 21 layers, infinite-width NTK",
    "entk": "Empirical NTK",
    "predict": "Predict (infinite NTK ensemble)",
}
#: The report's sections, in order (``tests``: the CUDA tests' pytest run).
SECTIONS = ["Steps", "Environment", "CUDA tests", *list(STEPS.values())[1:]]
#: Largest relative error of a device's float32 result against the CPU in float64.
TOLERANCE = 1e-3
#: Memory budget of the kernel tiles on a GPU (of its ~140 GB on an H200).
KERNEL_BUDGET = "16GiB"
#: Optional packages that gpu_check.sh must not need; ``env`` records which import.
OPTIONAL = ("dask", "distributed", "zarr", "hypothesis", "yaml", "matplotlib")


# ------------------------------------------------------------------ timing and checks
def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


#: Seconds a step may spend on repetitions after its warm-ups (set from --budget-s).
BUDGET = {"seconds": math.inf, "start": time.perf_counter()}


def timed(fn, device, reps: int) -> tuple[float, object]:
    """Best wall-clock seconds of up to ``reps`` calls of ``fn`` after one warm-up, and
    the warm-up's result. Fewer calls (at least one) when ``reps`` more would pass the
    step's budget (`BUDGET`), estimated from the warm-up."""
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - t0
    left = BUDGET["seconds"] - (time.perf_counter() - BUDGET["start"])
    if left < reps * first:
        reps = max(1, int(left / max(first, 1e-9)))
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _peak_mb(device) -> float | None:
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _row(name: str, seconds: float, entries: int, err: float, device, **extra) -> dict:
    return {"workload": name, "seconds": seconds, "entries": entries,
            "ms_per_entry": 1e3 * seconds / entries, "rel_err_vs_cpu64": err,
            "agrees": bool(err <= TOLERANCE), "peak_mb": _peak_mb(device), **extra}


# ------------------------------------------------------------------ the steps
def step_env(device, size, emit) -> None:
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device": str(device),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
    for name in ("numpy", "scipy", "sklearn", "click", "tqdm", "pytest", *OPTIONAL):
        try:
            mod = importlib.import_module(name)
            info[f"pkg_{name}"] = getattr(mod, "__version__", "installed")
        except ImportError:
            info[f"pkg_{name}"] = "not installed"
    import ntkit

    info["ntkit"] = str(Path(ntkit.__file__).parent)
    emit(info)


def _images(n: int, side: int, seed: int):
    import torch

    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _kernel_step(name: str, net, n: int, side: int, device, reps: int, emit, *,
                 check: tuple[int, int]) -> None:
    """NTK of ``net`` on ``n x n`` pairs of 3 x side x side images on ``device`` (float32),
    as ``k(x1, x2)`` and as ``k(x1)``, timed. The check: ``k(x1, x2)`` on ``device`` in
    float32 against the CPU in float64 on 1 x 2 images of side ``check[1]``
    (``check[0]`` of them): the CPU cannot afford the timed sizes of deep CNN-GAPs.
    On a GPU the kernel tiles get `KERNEL_BUDGET`; on the CPU, ntkit's default."""
    import torch

    x1, x2 = _images(n, side, 0), _images(n, side, 1)
    c1, c2 = _images(check[0], check[1], 2), _images(check[0], check[1], 3)
    got = net.kernel(c1.to(device), c2.to(device)).ntk
    err = rel_err(got, net.kernel(c1.double(), c2.double()).ntk)
    a, b = x1.to(device), x2.to(device)
    budget = KERNEL_BUDGET if torch.device(device).type == "cuda" else None
    name += f", memory_budget {budget}" if budget else ""
    seconds, _ = timed(lambda: net.kernel(a, b, memory_budget=budget).ntk, device, reps)
    emit(_row(f"{name}, k(x1, x2), {n} x {n} images 3x{side}x{side}", seconds, n * n, err,
              device, check=f"{check[0]} x {check[0]} images of side {check[1]}",
              memory_budget=budget))
    seconds, _ = timed(lambda: net.kernel(a, memory_budget=budget).ntk, device, reps)
    emit(_row(f"{name}, k(x1) symmetric, {n} images 3x{side}x{side}", seconds, n * n, err,
              device, check="through k(x1, x2)", memory_budget=budget))


def step_myrtle(device, size, emit) -> None:
    from run import myrtle5  # benchmarks/run.py

    n, reps = (8, 3) if size == "full" else (1, 1)
    _kernel_step("Myrtle-5", myrtle5(), n, 32, device, reps, emit, check=(2, 32))


def cnn_gap21(depth: int = 21):
    """21 x [Conv2d 3x3 'same' (w_std=sqrt(2), b_std=0), ReLU], GlobalAvgPool, Linear:
    the CNN-GAP of Arora et al. 2019 / neural-tangents' CNN-GAP benchmark."""
    import ntkit as nk

    layers = []
    for _ in range(depth):
        layers += [nk.Conv2d(1, 3, padding="same", w_std=math.sqrt(2), b_std=0.0), nk.ReLU()]
    return nk.Sequential(*layers, nk.GlobalAvgPool(), nk.Linear(1, w_std=1.0))


def step_cnn_gap21(device, size, emit) -> None:
    n, side, reps = (4, 32, 3) if size == "full" else (2, 6, 1)
    _kernel_step("CNN-GAP-21", cnn_gap21(), n, side, device, reps, emit,
                 check=(2, 8) if size == "full" else (1, 6))


def step_entk(device, size, emit) -> None:
    from run import entk_models  # benchmarks/run.py

    import ntkit as nk

    for case in ("entk", "entk_cnn") + (("entk_1024",) if size == "full" else ()):
        model, x, output = entk_models(case)
        if size != "full":
            x = x[:4]
        reps = 3 if size == "full" else 1
        reference = copy.deepcopy(model).double()
        m, xd = model.to(device), x.to(device)
        seconds, k = timed(lambda m=m, xd=xd, output=output: nk.empirical_ntk(
            m, xd, output=output), device, reps)
        err = rel_err(k[:4, :4], nk.empirical_ntk(reference, x[:4].double(), output=output))
        emit(_row(f"{case}: {type(model).__name__} on {tuple(x.shape)}, "
                  f"output={output!r}", seconds, x.shape[0] ** 2, err, device))
        del k


def _mean(prediction):
    """The mean of a prediction, whatever container the predict API returns."""
    if hasattr(prediction, "mean") and not callable(prediction.mean):
        return prediction.mean
    if isinstance(prediction, dict):
        return _mean(next(iter(prediction.values())))
    if isinstance(prediction, tuple):
        return prediction[0]
    return prediction


def step_predict(device, size, emit) -> None:
    import torch

    import ntkit as nk
    from ntkit import predict

    n_tr, n_te, d = (2000, 1000, 50) if size == "full" else (40, 20, 5)
    gen = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(n_tr, d, generator=gen), torch.randn(n_tr, 1, generator=gen)
    xte = torch.randn(n_te, d, generator=gen)
    net = nk.Sequential(nk.Linear(512), nk.ReLU(), nk.Linear(512), nk.ReLU(), nk.Linear(1))

    def run(a, b, c):
        pred = predict.gradient_descent_mse_ensemble(net, a, b, diag_reg=1e-4)
        return pred(c, None, get="ntk", compute_cov=True)

    dev = [t.to(device) for t in (xtr, ytr, xte)]
    seconds, out = timed(lambda: run(*dev), device, 3 if size == "full" else 1)
    want = run(xtr.double(), ytr.double(), xte.double())
    err = rel_err(_mean(out), _mean(want))
    emit(_row(f"gradient_descent_mse_ensemble, {n_tr} train / {n_te} test, {d} features, "
              f"mean and covariance at t = inf", seconds, n_tr * n_te, err, device))


# ------------------------------------------------------------------ the report
def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps_table(out: Path) -> list[str]:
    lines = ["| step | exit status | seconds | limit s | result |", "|---|---|---|---|---|"]
    path = out / "steps.tsv"
    rows = [ln.split("\t") for ln in path.read_text().splitlines()] if path.is_file() else []
    if not rows:
        return ["No steps recorded (steps.tsv missing): gpu_check.sh did not run the steps."]
    for name, rc, seconds, limit in ((r + ["", "", "", ""])[:4] for r in rows):
        verdict = {"0": "ok", "124": "TIMED OUT", "137": "KILLED (timeout)"}.get(rc, "FAILED")
        if rc == "skipped":
            verdict = "skipped"
        lines.append(f"| {name} | {rc} | {seconds} | {limit} | {verdict} |")
    return lines


def _log_tail(out: Path, name: str, n: int = 25) -> list[str]:
    path = out / f"{name}.log"
    if not path.is_file():
        return []
    tail = path.read_text(errors="replace").splitlines()[-n:]
    return ["", f"Last lines of {path.name}:", "", "```", *tail, "```"]


def _tests_section(out: Path) -> list[str]:
    xml, raw = out / "pytest_cuda.xml", out / "pytest_cuda.txt"
    if not xml.is_file():
        status = "not run" if not raw.is_file() else "no junit XML (pytest crashed or timed out)"
        return [f"CUDA tests: {status}."] + _log_tail(out, "pytest_cuda")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary = (f"{counts['tests']} selected: {passed} passed, {counts['failures']} failed, "
               f"{counts['errors']} errors, {counts['skipped']} skipped "
               f"(raw output: {raw.name}).")
    lines = [summary, "", "| test | outcome |", "|---|---|"]
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:120] if el.get("message") else ""
                outcome = f"{tag}: {msg}".replace("|", "/")
        lines.append(f"| {case.get('classname')}::{case.get('name')} | {outcome} |")
    return lines


def _rows_table(rows: list[dict]) -> list[str]:
    lines = [("| workload | seconds | entries | ms per entry | rel. error vs CPU float64 "
             "| peak GPU MB |"), "|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        check = f"{r['rel_err_vs_cpu64']:.1e}" + ("" if r["agrees"] else " MISMATCH")
        lines.append(f"| {r['workload']} | {r['seconds']:.4f} | {r['entries']} "
                     f"| {r['ms_per_entry']:.4g} | {check} | {peak} |")
    return lines


def write_report(out: Path) -> Path:
    """``out/report.md`` from what the steps left in ``out``; returns its path."""
    lines = ["# ntkit GPU check", "", (f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} "
             f"from {out}. A step that failed or timed out is marked in Steps, with the end "
             f"of its log in its section."), "", "## Steps", "", *_steps_table(out)]
    env = _load(out, "env")
    lines += ["", "## Environment", ""]
    if env and env["rows"]:
        lines += [f"- {k}: {v}" for k, v in env["rows"][0].items()]
    else:
        lines += ["Not recorded."] + _log_tail(out, "env")
    lines += ["", "## CUDA tests", "", *_tests_section(out)]
    for step, title in list(STEPS.items())[1:]:
        lines += ["", f"## {title}", ""]
        got = _load(out, step)
        if got is None:
            lines += [f"No result: the step {step} did not run or did not start."]
            lines += _log_tail(out, step)
            continue
        gap = [""] if got["rows"] else []     # a blank line after a table
        lines += _rows_table(got["rows"]) if got["rows"] else []
        if "error" in got:
            lines += [*gap, f"Failed: {got['error']}", "", "```", got["traceback"].rstrip(),
                      "```"]
        elif not got["done"]:
            lines += [*gap, (f"Incomplete: the step {step} stopped (timed out or crashed) after "
                          f"{len(got['rows'])} result(s).")] + _log_tail(out, step)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=[*STEPS, "report"])
    parser.add_argument("--out", type=Path, default=Path("gpu_out"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="seconds for the step's repetitions (fewer reps past it)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "report":
        print(write_report(args.out))
        return 0
    sys.path.insert(0, str(HERE))     # benchmarks/run.py's workloads
    BUDGET.update(seconds=args.budget_s, start=time.perf_counter())
    path = args.out / f"{args.step}.json"
    result = {"step": args.step, "device": args.device, "size": args.size, "rows": [],
              "done": False}

    def emit(row: dict) -> None:      # each row is saved at once: a timeout keeps it
        result["rows"].append(row)
        result["wall_s"] = round(time.perf_counter() - BUDGET["start"], 2)
        path.write_text(json.dumps(result, indent=2))

    path.write_text(json.dumps(result, indent=2))
    code = 0
    try:
        globals()[f"step_{args.step}"](args.device, args.size, emit)
    except Exception as e:            # noqa: BLE001 - recorded in the report, exit 1
        result.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        code = 1
    result.update(done=code == 0, wall_s=round(time.perf_counter() - BUDGET["start"], 2))
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
