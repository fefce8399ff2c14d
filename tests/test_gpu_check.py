"""benchmarks/gpu_check.sh and gpu_bench.py, run here on the CPU with tiny sizes.

The check is meant for a GPU machine where only torch, pytest, numpy, scipy,
scikit-learn, tqdm and click are installed and ntkit is not: the end-to-end run
blocks the optional packages (dask, zarr, ...) and takes ntkit from src/ only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_bench

BLOCKED = ("dask", "distributed", "zarr", "hypothesis", "yaml", "matplotlib")


def _block(site: Path) -> None:
    """Packages in ``site`` (first on PYTHONPATH) that shadow the optional ones and fail to
    import, as on the GPU machine where they are not installed. (A meta-path finder that
    raises would also break torch, which probes for optional modules with find_spec.)"""
    for name in BLOCKED:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {name!r} (blocked: not installed on '
            f'the GPU machine)", name={name!r})\n')


def test_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_step_limits_fit_in_eight_minutes():
    """The steps' timeouts, plus the kill grace of each and the report's timeout, stay
    under 8 minutes."""
    text = SCRIPT.read_text()
    limits = [int(v) for v in re.findall(r"^\s*(?:bench \w+|step \w+) (\d+)", text, re.MULTILINE)]
    assert len(limits) == 6                  # env, pytest_cuda, 4 benchmarks
    (grace,) = map(int, re.findall(r"timeout -k (\d+) ", text))
    (report,) = map(int, re.findall(r"timeout (\d+) \S+ benchmarks/gpu_bench.py report", text))
    assert sum(limits) + grace * len(limits) + report <= 8 * 60


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Path:
    """gpu_check.sh end to end on the CPU, tiny sizes, without the CUDA tests' pytest run
    (this is a test run already), optional packages blocked."""
    out = tmp_path_factory.mktemp("gpu_out")
    site = tmp_path_factory.mktemp("site")
    _block(site)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTKIT_")}
    env.update(OUT=str(out), NTKIT_GPU_CHECK_DEVICE="cpu", NTKIT_GPU_CHECK_SIZE="tiny",
               NTKIT_GPU_CHECK_PYTEST="0", NTKIT_GPU_CHECK_PYTHON=sys.executable,
               PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_cpu_run_writes_every_section(cpu_run):
    """report.md has every section, in order, and every step ran and succeeded."""
    report = (cpu_run / "report.md").read_text()
    positions = [report.find(f"\n## {s}\n") for s in gpu_bench.SECTIONS]
    assert all(p >= 0 for p in positions), report
    assert positions == sorted(positions)
    steps = [line.split("\t") for line in (cpu_run / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["env", "pytest_cuda", "myrtle", "cnn_gap21", "entk",
                                     "predict"]
    assert {s[0]: s[1] for s in steps} == {"env": "0", "pytest_cuda": "skipped", "myrtle": "0",
                                           "cnn_gap21": "0", "entk": "0", "predict": "0"}
    assert "FAILED" not in report and "MISMATCH" not in report and "Incomplete" not in report


def test_cpu_run_results(cpu_run):
    """Every benchmark step saved its rows; ms per entry is seconds / entries; the device's
    float32 result agrees with the CPU's float64 one; the blocked packages are reported as
    not installed, and ntkit came from src/."""
    env = json.loads((cpu_run / "env.json").read_text())["rows"][0]
    assert all(env[f"pkg_{name}"] == "not installed" for name in BLOCKED)
    assert Path(env["ntkit"]) == ROOT / "src" / "ntkit"
    expected_rows = {"myrtle": 2, "cnn_gap21": 2, "entk": 2, "predict": 1}
    for step, n in expected_rows.items():
        got = json.loads((cpu_run / f"{step}.json").read_text())
        assert got["done"] and "error" not in got and got["device"] == "cpu"
        assert len(got["rows"]) == n, step
        for row in got["rows"]:
            assert row["seconds"] > 0 and row["entries"] > 0
            assert row["ms_per_entry"] == pytest.approx(1e3 * row["seconds"] / row["entries"])
            assert 0 <= row["rel_err_vs_cpu64"] < 1e-4 and row["agrees"], row
            assert row["workload"] in (cpu_run / "report.md").read_text()


def _write(out: Path, name: str, payload: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(payload))


def test_report_records_failures_and_timeouts(tmp_path):
    """A step that timed out (124), one that raised, one that never started and a CUDA
    test that failed are each named in the report; results saved before a timeout are
    kept."""
    row = {"workload": "Myrtle-5, k(x1, x2)", "seconds": 2.0, "entries": 4,
           "ms_per_entry": 500.0, "rel_err_vs_cpu64": 3e-2, "agrees": False, "peak_mb": 12.5}
    (tmp_path / "steps.tsv").write_text("env\t0\t3\t30\nmyrtle\t124\t60\t60\n"
                                        "cnn_gap21\t1\t5\t90\nentk\t137\t70\t60\n")
    _write(tmp_path, "env", {"rows": [{"torch": "2.11.0+cu128"}], "done": True})
    _write(tmp_path, "myrtle", {"rows": [row], "done": False})
    _write(tmp_path, "cnn_gap21", {"rows": [], "done": False, "error": "RuntimeError: boom",
                                   "traceback": "Traceback ...\nRuntimeError: boom"})
    (tmp_path / "entk.log").write_text("line 1\nKilled while computing entk_cnn\n")
    (tmp_path / "pytest_cuda.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_attention" name="test_cuda[a]"/>'
        '<testcase classname="tests.test_empirical" name="test_cuda_matches_cpu[x]">'
        '<failure message="assert 0.1 &lt; 1e-5">trace</failure></testcase>'
        '<testcase classname="tests.test_kernel_matrix" name="test_devices">'
        '<skipped message="needs dask"/></testcase></testsuite></testsuites>')
    report = gpu_bench.write_report(tmp_path).read_text()
    assert all(f"\n## {s}\n" in report for s in gpu_bench.SECTIONS)
    assert "| myrtle | 124 | 60 | 60 | TIMED OUT |" in report
    assert "| cnn_gap21 | 1 | 5 | 90 | FAILED |" in report
    assert "| entk | 137 | 70 | 60 | KILLED (timeout) |" in report
    assert "| Myrtle-5, k(x1, x2) | 2.0000 | 4 | 500 | 3.0e-02 MISMATCH | 12 |" in report
    assert "Incomplete: the step myrtle stopped" in report
    assert "Failed: RuntimeError: boom" in report
    assert "No result: the step entk" in report and "Killed while computing entk_cnn" in report
    assert "No result: the step predict" in report
    assert "3 selected: 1 passed, 1 failed, 0 errors, 1 skipped" in report
    assert "failure: assert 0.1 < 1e-5" in report and "skipped: needs dask" in report
    assert "- torch: 2.11.0+cu128" in report


def test_timed_keeps_to_the_budget(monkeypatch):
    """Repetitions stop when the budget (estimated from the warm-up) would be passed, but
    one always runs; without a budget, all run."""
    calls = []
    clock = iter(range(0, 10_000, 5))           # every perf_counter() call: 5 s later
    monkeypatch.setattr(gpu_bench.time, "perf_counter", lambda: next(clock))
    monkeypatch.setitem(gpu_bench.BUDGET, "seconds", 12)
    monkeypatch.setitem(gpu_bench.BUDGET, "start", 0)
    seconds, out = gpu_bench.timed(lambda: calls.append(1) or "first", "cpu", 10)
    assert out == "first" and seconds == 5 and len(calls) == 1 + 1
    monkeypatch.setitem(gpu_bench.BUDGET, "seconds", float("inf"))
    calls.clear()
    gpu_bench.timed(lambda: calls.append(1), "cpu", 3)
    assert len(calls) == 1 + 3
