"""The `ntkit` command line: kernel, fit, predict, bench, --help, and error paths.

End-to-end runs go through a subprocess (`python -m ntkit ...`); the many error
paths run in-process with click's CliRunner (the same code, without paying for a
fresh torch import each time). The demo's own tests are in tests/test_demo.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ntkit import cli
from ntkit.cli import _demo, _kernel
from ntkit.spec import parse_architecture

ARCH = "linear(64,w_std=1.5,b_std=0.1)-relu-linear(1)"
COMMANDS = ["demo", "kernel", "fit", "predict", "bench"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ntkit", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def invoke(*args: str):
    return CliRunner().invoke(cli.cli, list(args))


def expected_kernel(x: np.ndarray, arch: str = ARCH, x2: np.ndarray | None = None,
                    dtype=torch.float32):
    net = parse_architecture(arch)
    return net.kernel(torch.as_tensor(x, dtype=dtype),
                      None if x2 is None else torch.as_tensor(x2, dtype=dtype))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The same 40 x 5 inputs as .npy, .npz (x, y) and .csv (header, label column last);
    a second batch of 7; a classification set (3 classes) and a regression set."""
    d = tmp_path_factory.mktemp("data")
    g = np.random.default_rng(0)
    x = g.standard_normal((40, 5))
    labels = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    np.save(d / "x.npy", x)
    np.savez(d / "x.npz", x=x, y=labels)
    np.savetxt(d / "x.csv", np.c_[x, labels], delimiter=",",
               header="a,b,c,d,e,label", comments="", fmt="%.17g")
    np.save(d / "x2.npy", g.standard_normal((7, 5)))
    xc = g.standard_normal((150, 4))
    yc = np.array(["low", "mid", "high"])[(xc[:, 0] > -0.4).astype(int)
                                           + (xc[:, 0] > 0.4).astype(int)]
    with open(d / "classes.csv", "w") as f:
        f.write("f0,f1,f2,f3,kind\n")
        f.writelines(",".join(f"{v:.17g}" for v in row) + f",{lab}\n" for row, lab in zip(xc, yc))
    xr = g.standard_normal((120, 3))
    np.savez(d / "reg.npz", x=xr, y=np.sin(xr[:, 0]) + 0.5 * xr[:, 1] ** 2)
    return {"dir": d, "x": x, "labels": labels, **{p.name: p for p in d.iterdir()}}


# ------------------------------------------------------------------------- --help
@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS],
                         ids=["ntkit"] + COMMANDS)
def test_help(command):
    """Every command documents itself and its options."""
    r = invoke(*command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage: " in r.output
    if command:
        assert r.output.count("--") >= 1
    else:
        for c in COMMANDS:
            assert c in r.output


def test_console_script_and_module_help():
    """`python -m ntkit --help` works in a fresh process; the console script when installed."""
    r = run("--help")
    assert r.returncode == 0 and "kernel" in r.stdout and "demo" in r.stdout
    if shutil.which("ntkit"):
        p = subprocess.run(["ntkit", "kernel", "--help"], capture_output=True, text=True,
                           timeout=120, check=False)
        assert p.returncode == 0 and "--memory-budget" in p.stdout


def test_unknown_command_is_a_usage_error():
    r = invoke("train")
    assert r.exit_code == 2 and "No such command 'train'" in r.output


# ------------------------------------------------------------------------- kernel
def test_kernel_npy_end_to_end(data, tmp_path):
    """In a subprocess: the .npy output equals net.kernel's NTK, and a progress bar shows."""
    out = tmp_path / "k.npy"
    r = run("kernel", ARCH, str(data["x.npy"]), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote ntk (40 x 40, float32)" in r.stdout
    assert "kernel tiles" in r.stderr                         # tqdm, on stderr
    k = np.load(out)
    assert k.dtype == np.float32
    np.testing.assert_allclose(k, expected_kernel(data["x"]).ntk.numpy(), rtol=1e-6, atol=1e-6)


def test_kernel_npz_csv_and_x2(data, tmp_path):
    """.csv with the label column dropped, against a second .npy batch, both kernels in
    float64 to an .npz."""
    out = tmp_path / "k.npz"
    r = invoke("kernel", ARCH, str(data["x.csv"]), "--label-column", "label", "--x2",
               str(data["x2.npy"]), "--dtype", "float64", "-o", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    x2 = np.load(data["x2.npy"])
    k = expected_kernel(data["x"], x2=x2, dtype=torch.float64)
    with np.load(out) as z:
        assert sorted(z.files) == ["nngp", "ntk"]
        assert z["ntk"].shape == (40, 7) and z["ntk"].dtype == np.float64
        np.testing.assert_allclose(z["ntk"], k.ntk.numpy(), rtol=1e-12)
        np.testing.assert_allclose(z["nngp"], k.nngp.numpy(), rtol=1e-12)


def test_kernel_npz_input_and_label_index(data, tmp_path):
    """.npz input (key x), NNGP only; a .csv label column given by index -1 is the same."""
    r = invoke("kernel", ARCH, str(data["x.npz"]), "--get", "nngp", "-o",
               str(tmp_path / "a.npy"), "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("kernel", ARCH, str(data["x.csv"]), "--label-column", "-1", "--get", "nngp",
               "-o", str(tmp_path / "b.npy"), "--no-progress")
    assert r.exit_code == 0, r.output
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    np.testing.assert_allclose(a, expected_kernel(data["x"]).nngp.numpy(), rtol=1e-6)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_kernel_json_architecture_and_input_shape(tmp_path):
    """A JSON architecture file; flat rows reshaped to images with --input-shape."""
    arch = tmp_path / "cnn.json"
    arch.write_text('{"layers": [{"layer": "conv2d", "args": [8, 3], "kwargs": '
                    '{"padding": "same"}}, "relu", "globalavgpool", "linear(1)"]}')
    x = np.random.default_rng(1).standard_normal((6, 2 * 5 * 5))
    np.save(tmp_path / "flat.npy", x)
    r = invoke("kernel", str(arch), str(tmp_path / "flat.npy"), "--input-shape", "2,5,5",
               "-o", str(tmp_path / "k.npy"), "--no-progress")
    assert r.exit_code == 0, r.output
    k = parse_architecture(arch).kernel(torch.as_tensor(x.reshape(6, 2, 5, 5),
                                                        dtype=torch.float32))
    np.testing.assert_allclose(np.load(tmp_path / "k.npy"), k.ntk.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------- kernel: tiles
TILING_OPTIONS = ("--store", "--resume", "--overwrite", "--workers", "--scheduler",
                  "--tile-size")


def _done_mask(store: Path) -> np.ndarray:
    import zarr

    return zarr.open_group(str(store), mode="r")["done"][...]


def test_kernel_workers_store_and_resume(data, tmp_path):
    """--workers 2 --store: the NTK of net.kernel, 40 rows in tiles of 16 (the 6 tiles on
    and above the diagonal of a 3 x 3 grid); a second run with --resume computes no tile
    and writes the same file; without --resume the store is refused, and with other
    inputs --resume is refused (--overwrite named)."""
    store, out = tmp_path / "tiles", tmp_path / "k.npy"
    args = ("kernel", ARCH, str(data["x.npy"]), "-o", str(out), "--store", str(store),
            "--tile-size", "16", "--no-progress")
    r = invoke(*args, "--workers", "2")
    assert r.exit_code == 0, r.output
    assert f"ntk: 6 tiles computed, 0 reused from {store / 'ntk'}" in r.output
    first = np.load(out)
    np.testing.assert_allclose(first, expected_kernel(data["x"]).ntk.numpy(), rtol=1e-6,
                               atol=1e-6)
    assert np.array_equal(_done_mask(store / "ntk"), np.triu(np.ones((3, 3), dtype=bool)))
    r = invoke(*args, "--workers", "2", "--resume")
    assert r.exit_code == 0, r.output
    assert "ntk: 0 tiles computed, 6 reused" in r.output
    assert np.array_equal(np.load(out), first)
    r = invoke(*args)
    assert r.exit_code == 1
    assert "already exists; pass --resume to continue it" in r.output and "--overwrite" in r.output
    r = invoke("kernel", ARCH, str(data["x2.npy"]), "-o", str(tmp_path / "other.npy"),
               "--store", str(store), "--resume", "--no-progress")
    assert r.exit_code == 1, r.output
    assert f"Error: the store {store / 'ntk'} holds a kernel matrix computed with a different " \
           "x1" in r.output
    assert "Pass --overwrite to discard it" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "other.npy").exists()


def test_kernel_tiles_in_process_both_kinds(data, tmp_path):
    """--tile-size alone tiles in this process; --get both fills DIR/nngp and DIR/ntk, and
    --overwrite replaces a store of other inputs."""
    store, out = tmp_path / "tiles", tmp_path / "k.npz"
    assert invoke("kernel", ARCH, str(data["x2.npy"]), "-o", str(out), "--store", str(store),
                  "--no-progress").exit_code == 0
    r = invoke("kernel", ARCH, str(data["x.npy"]), "--x2", str(data["x2.npy"]), "-o", str(out),
               "--store", str(store), "--overwrite", "--tile-size", "8", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "nngp: 5 tiles computed" in r.output and "ntk: 5 tiles computed" in r.output
    k = expected_kernel(data["x"], x2=np.load(data["x2.npy"]))
    with np.load(out) as z:
        np.testing.assert_allclose(z["nngp"], k.nngp.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(z["ntk"], k.ntk.numpy(), rtol=1e-6, atol=1e-6)
    assert _done_mask(store / "nngp").all() and _done_mask(store / "ntk").shape == (5, 1)


def test_kernel_on_a_running_scheduler(data, tmp_path):
    """--scheduler ADDRESS sends the tiles to a running cluster (here one in this process)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        r = invoke("kernel", ARCH, str(data["x.npy"]), "-o", str(tmp_path / "k.npy"),
                   "--scheduler", cluster.scheduler_address, "--tile-size", "20",
                   "--no-progress")
    assert r.exit_code == 0, r.output
    assert "ntk: 3 tiles computed" in r.output
    np.testing.assert_allclose(np.load(tmp_path / "k.npy"), expected_kernel(data["x"]).ntk,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["workers_and_scheduler", "resume_without_store",
                                  "resume_and_overwrite", "unreachable_scheduler"])
def test_kernel_tiling_errors(case, data, tmp_path, monkeypatch):
    """Options that do not go together are usage errors; a scheduler that does not answer
    within the timeout is one `Error:` line with its address and what to do."""
    monkeypatch.setattr(_kernel, "SCHEDULER_TIMEOUT_S", 1)
    out, store = str(tmp_path / "k.npy"), str(tmp_path / "tiles")
    cases = {
        "workers_and_scheduler": (("--workers", "2", "--scheduler", "tcp://127.0.0.1:9"), 2,
                                  "not both"),
        "resume_without_store": (("--resume",), 2, ("--resume applies to a tile store; give it "
                                                   "with --store DIR")),
        "resume_and_overwrite": (("--store", store, "--resume", "--overwrite"), 2,
                                 "give one of them"),
        "unreachable_scheduler": (("--scheduler", "tcp://127.0.0.1:9"), 1,
                                  ("Error: cannot reach the Dask scheduler at "
                                  "tcp://127.0.0.1:9 (")),
    }
    args, code, message = cases[case]
    r = invoke("kernel", ARCH, str(data["x.npy"]), "-o", out, "--no-progress", *args)
    assert r.exit_code == code, r.output
    assert message in r.output, r.output
    assert "Traceback" not in r.output and not Path(out).exists()
    if case == "unreachable_scheduler":
        assert r.output.count("\n") == 1 and "--workers N" in r.output


def test_kernel_help_lists_tiling_options():
    r = invoke("kernel", "--help")
    assert r.exit_code == 0
    for option in TILING_OPTIONS:
        assert option in r.output, option


# ------------------------------------------------------------------------- errors
def test_spec_error_in_a_subprocess(data, tmp_path):
    """A spec that does not parse: exit 1, `Error:` with the position and a caret, no
    traceback."""
    r = run("kernel", "linear(64)-rleu-linear(1)", str(data["x.npy"]), "-o",
            str(tmp_path / "k.npy"))
    assert r.returncode == 1
    assert r.stderr.startswith("Error: cannot parse architecture at character 12: unknown "
                               "layer 'rleu'")
    assert "           ^^^^" in r.stderr and "known layers:" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "k.npy").exists()


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("case", [
    "missing_file", "bad_suffix", "malformed_npy", "npz_without_key", "csv_text_cell",
    "csv_ragged", "csv_unknown_label_column", "nan_input", "one_d_input", "shape_mismatch",
    "bad_output_suffix", "both_in_npy", "bad_memory_budget", "missing_arch_file",
])
def test_kernel_errors(case, data, tmp_path):
    """Each bad input exits non-zero with one `Error:` message naming the problem."""
    d = tmp_path
    x = str(data["x.npy"])
    out = str(d / "k.npy")
    cases = {
        "missing_file": ((ARCH, str(d / "nope.npy"), "-o", out), 1, "nope.npy' does not exist"),
        "bad_suffix": ((ARCH, str(_write(d / "x.txt", "1,2")), "-o", out), 1,
                       "must be .npy, .npz or .csv"),
        "malformed_npy": ((ARCH, str(_write(d / "bad.npy", b"not numpy")), "-o", out), 1,
                          "cannot read bad.npy"),
        "npz_without_key": ((ARCH, str(data["x.npz"]), "--key", "inputs", "-o", out), 1,
                            "has no array 'inputs'; it holds x, y"),
        "csv_text_cell": ((ARCH, str(_write(d / "t.csv", "a,b\n1,2\n3,oops\n")), "-o", out), 1,
                          "t.csv, line 3: column 1 ('b') is not a number: 'oops'"),
        "csv_ragged": ((ARCH, str(_write(d / "r.csv", "1,2\n3\n")), "-o", out), 1,
                       "r.csv, line 2: 1 columns, expected 2"),
        "csv_unknown_label_column": ((ARCH, str(data["x.csv"]), "--label-column", "target",
                                      "-o", out), 1, ("no label column 'target'; the columns "
                                                     "are a, b, c, d, e, label")),
        "nan_input": ((ARCH, str(_write(d / "n.csv", "1,2\nnan,3\n")), "-o", out), 1,
                      "NaN or infinite values (first at row 1, column 0)"),
        "one_d_input": ((ARCH, str(_save(d / "v.npy", np.ones(5))), "-o", out), 1,
                        "shape (N, features)"),
        "shape_mismatch": (("conv2d(4,3)-flatten-linear(1)", x, "-o", out), 1,
                           ("the architecture does not fit the data (x.npy, examples of "
                           "shape (5,))")),
        "bad_output_suffix": ((ARCH, x, "-o", str(d / "k.txt")), 2, "must end in .npy or .npz"),
        "both_in_npy": ((ARCH, x, "--get", "both", "-o", out), 2, "holds one kernel"),
        "bad_memory_budget": ((ARCH, x, "--memory-budget", "lots", "-o", out), 2, "lots"),
        "missing_arch_file": ((str(d / "net.yaml"), x, "-o", out), 1,
                              "net.yaml' does not exist"),
    }
    args, code, message = cases[case]
    r = invoke("kernel", *args)
    assert r.exit_code == code, r.output
    assert message in r.output, r.output
    assert "Error" in r.output and "Traceback" not in r.output


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


# ------------------------------------------------------------------------- fit/predict
def _metric(text: str, name: str, where: str) -> float:
    m = re.search(rf"{where}.*?{name} ([-0-9.e]+)", text)
    assert m, text
    return float(m.group(1))


def test_fit_then_predict_classification(data, tmp_path):
    """In subprocesses: fit on a .csv with string labels, save, load in `predict` on the
    held-out split, which reproduces the test accuracy; predictions written to .csv."""
    model, test = tmp_path / "m.npz", tmp_path / "test.npz"
    r = run("fit", str(data["classes.csv"]), "--label-column", "kind", "--arch", ARCH,
            "-o", str(model), "--save-test", str(test), "--test-size", "0.3")
    assert r.returncode == 0, r.stderr
    assert "task: classification" in r.stdout and "NTKClassifier" in r.stdout
    acc = _metric(r.stdout, "accuracy", r"test \(45 examples\)")
    assert acc > 0.8                       # three classes split by one feature
    with open(model, "rb") as f:           # the model file is a plain .npz
        assert f.read(2) == b"PK"
    preds = tmp_path / "p.csv"
    r = run("predict", str(model), str(test), "-o", str(preds))
    assert r.returncode == 0, r.stderr
    assert _metric(r.stdout, "accuracy", "test.npz") == acc
    written = preds.read_text().split()
    assert len(written) == 45 and set(written) <= {"low", "mid", "high"}


def test_fit_then_predict_regression(data, tmp_path):
    """Regression from an .npz (x, y) with an explicit test file: MSE and R2 printed by
    fit are reproduced by predict, and agree with an estimator fitted in-process."""
    from ntkit.sklearn import NTKRegressor

    with np.load(data["reg.npz"]) as z:
        x, y = z["x"], z["y"]
    np.savez(tmp_path / "train.npz", x=x[:90], y=y[:90])
    np.savez(tmp_path / "test.npz", x=x[90:], y=y[90:])
    model = tmp_path / "reg-model.npz"
    r = invoke("fit", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"),
               "--arch", ARCH, "--get", "nngp", "--t", "100", "-o", str(model))
    assert r.exit_code == 0, r.output
    assert "task: regression" in r.output
    mse, r2 = _metric(r.output, "MSE", "test"), _metric(r.output, "R2", "test")
    direct = NTKRegressor(ARCH, get="nngp", t=100.0).fit(x[:90], y[:90]).predict(x[90:])
    np.testing.assert_allclose(mse, np.mean((direct - y[90:]) ** 2), rtol=1e-3)
    assert 0.5 < r2 <= 1
    r = invoke("predict", str(model), str(tmp_path / "test.npz"), "-o",
               str(tmp_path / "p.npy"))
    assert r.exit_code == 0, r.output
    assert _metric(r.output, "MSE", "test.npz") == mse
    assert _metric(r.output, "R2", "test.npz") == r2
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), direct, rtol=1e-10)


def test_fit_then_predict_convolutional_with_input_shape(tmp_path):
    """Flattened 8x8 digits as 1 x 8 x 8 images through a CNN (--input-shape): fit's test
    accuracy beats chance by far, predict on the saved held-out images reproduces it, and
    agrees with an NTKClassifier fitted in-process on the same split."""
    from ntkit.datasets import load_digits
    from ntkit.sklearn import NTKClassifier

    x, y = load_digits()
    x, y = x[:300].numpy(), y[:300].numpy()
    np.savez(tmp_path / "train.npz", x=x[:200], y=y[:200])
    np.savez(tmp_path / "test.npz", x=x[200:], y=y[200:])
    arch = "conv2d(16,3,padding=same)-relu-avgpool2d(2)-flatten-linear(10)"
    model = tmp_path / "cnn.npz"
    r = invoke("fit", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"),
               "--input-shape", "1,8,8", "--arch", arch, "-o", str(model))
    assert r.exit_code == 0, r.output
    acc = _metric(r.output, "accuracy", "test")
    direct = NTKClassifier(arch, input_shape=(1, 8, 8)).fit(x[:200], y[:200])
    assert acc == pytest.approx(direct.score(x[200:], y[200:]), abs=1e-9)
    assert acc > 0.8
    r = invoke("predict", str(model), str(tmp_path / "test.npz"), "--input-shape", "1,8,8")
    assert r.exit_code == 0, r.output
    assert _metric(r.output, "accuracy", "test.npz") == acc


def test_fit_bundled_digits(tmp_path):
    """--dataset digits: above 0.9 held-out accuracy with 10% of the data (179 digits) as
    training set, to stay quick (chance is 0.1)."""
    r = invoke("fit", "--dataset", "digits", "--test-size", "0.9", "-o", str(tmp_path / "d.npz"))
    assert r.exit_code == 0, r.output
    assert _metric(r.output, "accuracy", r"test \(1618 examples\)") > 0.9


@pytest.mark.parametrize("case", [
    "continuous_for_classifier", "strings_for_regression", "rows_mismatch", "no_labels",
    "one_class", "data_and_dataset", "bad_spec", "nan_labels",
])
def test_fit_errors(case, data, tmp_path):
    d = tmp_path
    x = data["x"]
    np.savez(d / "cont.npz", x=x, y=x[:, 0])
    np.savez(d / "rows.npz", x=x, y=np.arange(39))
    np.savez(d / "one.npz", x=x, y=np.zeros(40, dtype=int))
    np.savez(d / "nan.npz", x=x, y=np.where(x[:, 0] > 0, np.nan, 1.0))
    out = str(d / "m.npz")
    cases = {
        "continuous_for_classifier": (("fit", str(d / "cont.npz"), "--task", "classify", "-o",
                                       out), 1, "labels are continuous (e.g. "),
        "strings_for_regression": (("fit", str(data["classes.csv"]), "--label-column", "kind",
                                    "--task", "regress", "-o", out), 1,
                                   "regression needs numeric targets"),
        "rows_mismatch": (("fit", str(d / "rows.npz"), "-o", out), 1, "40 inputs but 39 labels"),
        "no_labels": (("fit", str(data["x.npy"]), "-o", out), 1, "x.npy has no labels"),
        "one_class": (("fit", str(d / "one.npz"), "--task", "classify", "-o", out), 1,
                      "one class only"),
        "data_and_dataset": (("fit", str(data["x.npz"]), "--dataset", "digits", "-o", out), 2,
                             "either as a DATA file or with --dataset"),
        "bad_spec": (("fit", str(data["x.npz"]), "--arch", "linear(8)-relu-", "-o", out), 1,
                     "at character 16: expected a layer name"),
        "nan_labels": (("fit", str(d / "nan.npz"), "--task", "regress", "-o", out), 1,
                       "NaN or infinite"),
    }
    args, code, message = cases[case]
    r = invoke(*args)
    assert r.exit_code == code, r.output
    assert message in r.output, r.output
    assert not Path(out).exists()


def test_predict_errors(data, tmp_path):
    """Missing or foreign model files and data of the wrong width are refused."""
    r = invoke("predict", str(tmp_path / "none.npz"), str(data["x.npy"]))
    assert r.exit_code == 1 and "none.npz' does not exist" in r.output
    r = invoke("predict", str(data["x.npz"]), str(data["x.npy"]))
    assert r.exit_code == 1 and "cannot load the model x.npz" in r.output
    model = tmp_path / "m.npz"
    assert invoke("fit", str(data["x.npz"]), "--arch", ARCH, "-o", str(model)).exit_code == 0
    np.save(tmp_path / "wide.npy", np.ones((3, 6)))
    r = invoke("predict", str(model), str(tmp_path / "wide.npy"))
    assert r.exit_code == 1 and "fitted on 5 features per example" in r.output
    r = invoke("predict", str(model), str(data["x.npy"]), "-o", str(tmp_path / "p.txt"))
    assert r.exit_code == 2 and ".npy or .csv" in r.output


# ------------------------------------------------------------------------- bench
def test_bench_passes_arguments_to_the_script():
    """`ntkit bench -- --help` shows benchmarks/run.py's own options."""
    r = run("bench", "--", "--help", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--reps" in r.stdout and "--no-peer" in r.stdout


def test_bench_outside_a_checkout(monkeypatch, tmp_path):
    """Without benchmarks/run.py nearby, a clear error instead of a traceback."""
    monkeypatch.setattr(_demo, "__file__",
                        str(tmp_path / "a" / "b" / "ntkit" / "cli" / "_demo.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NTKIT_BENCHMARKS", raising=False)
    r = invoke("bench", "fc")
    assert r.exit_code == 1 and "from a source checkout" in r.output


# ------------------------------------------------------------------------- --get and its old names
@pytest.mark.parametrize("get", ["ntk", "nngp"])
def test_kernel_deprecated_kind_still_works(get, data, tmp_path):
    """--kind (the old name of --get) writes the same kernel as --get, with a deprecation
    notice on stderr; it is hidden from --help."""
    runner = CliRunner()
    new, old = tmp_path / "new.npy", tmp_path / "old.npy"
    r = runner.invoke(cli.cli, ["kernel", ARCH, str(data["x.npy"]), "--get", get, "-o",
                                str(new), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "is deprecated" not in r.stderr
    r = runner.invoke(cli.cli, ["kernel", ARCH, str(data["x.npy"]), "--kind", get, "-o",
                                str(old), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "--kind is deprecated" in r.stderr and f"use --get {get}" in r.stderr
    assert "is deprecated" not in r.stdout
    np.testing.assert_array_equal(np.load(old), np.load(new))
    np.testing.assert_allclose(np.load(new), getattr(expected_kernel(data["x"]), get).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert "--kind" not in invoke("kernel", "--help").output
    assert "--get" in invoke("kernel", "--help").output


def test_fit_deprecated_kernel_option(data, tmp_path):
    """fit --kernel nngp (the old name of --get) fits the same model as --get nngp, with
    a notice on stderr; contradicting values are a usage error."""
    from ntkit.sklearn import load

    runner = CliRunner()
    args = ["fit", str(data["reg.npz"]), "--arch", ARCH, "--t", "50"]
    r = runner.invoke(cli.cli, [*args, "--get", "nngp", "-o", str(tmp_path / "a.npz")])
    assert r.exit_code == 0, r.output
    r_old = runner.invoke(cli.cli, [*args, "--kernel", "nngp", "-o", str(tmp_path / "b.npz")])
    assert r_old.exit_code == 0, r_old.output
    assert "--kernel is deprecated" in r_old.stderr and "use --get nngp" in r_old.stderr
    x = np.load(data["reg.npz"])["x"]
    a, b = load(tmp_path / "a.npz"), load(tmp_path / "b.npz")
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    ntk = runner.invoke(cli.cli, [*args, "-o", str(tmp_path / "c.npz")])
    assert ntk.exit_code == 0, ntk.output
    assert not np.allclose(load(tmp_path / "c.npz").predict(x), a.predict(x))
    r = runner.invoke(cli.cli, [*args, "--get", "ntk", "--kernel", "nngp", "-o",
                                str(tmp_path / "d.npz")])
    assert r.exit_code == 2 and "disagree" in r.output
    assert not (tmp_path / "d.npz").exists()


def test_one_name_for_the_selector_in_the_cli():
    """The CLI's source names the NNGP/NTK selector --get; the old names appear once each,
    as the deprecated alias given to get_option."""
    bodies = {p.name: p.read_text() for p in Path(cli.__file__).parent.glob("*.py")}
    where = {old: [name for name, body in bodies.items() for _ in range(body.count(old))]
             for old in ('"--kind"', '"--kernel"')}
    assert where == {'"--kind"': ["_kernel.py"], '"--kernel"': ["_fit.py"]}


# ------------------------------------------------------------------------- the table of failures
class _FailingNet:
    """A stand-in network whose kernel raises ``error``."""

    def __init__(self, error: BaseException):
        self.error = error

    def kernel(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("error, code, message", [
    (MemoryError(), 3, "Error: out of memory: MemoryError Lower --memory-budget"),
    (KeyboardInterrupt(), 130, "Error: interrupted."),
    (ValueError("width 0"), 1, ("Error: the architecture does not fit the data (x.npy, "
                                "examples of shape (5,)): width 0")),
    (FileNotFoundError(2, "No such file or directory", "w.pt"), 1,
     "Error: 'w.pt' does not exist (No such file or directory)."),
], ids=["memory", "interrupt", "value", "file_not_found"])
def test_failures_map_to_one_line_and_an_exit_status(error, code, message, data, tmp_path,
                                                     monkeypatch):
    """Each exception type of the table prints one `Error:` line with its exit status; the
    library's message is printed as written."""
    monkeypatch.setattr(_kernel, "architecture_arg", lambda spec: _FailingNet(error))
    out = tmp_path / "k.npy"
    r = invoke("kernel", ARCH, str(data["x.npy"]), "-o", str(out), "--no-progress")
    assert r.exit_code == code, r.output
    assert r.output.startswith(message), r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output
    assert not out.exists()


def test_typed_library_failures(data, tmp_path, monkeypatch):
    """ntkit.errors' typed failures keep the library's message (causes and fixes) and add
    the command line's own fix: a memory budget error exits 3, a kernel that is not
    positive definite 1, after what the command was doing."""
    from ntkit import errors
    from ntkit.sklearn import NTKRegressor

    error = errors.out_of_memory("the kernel tiles", "2 GiB asked")
    monkeypatch.setattr(_kernel, "architecture_arg", lambda spec: _FailingNet(error))
    r = invoke("kernel", ARCH, str(data["x.npy"]), "-o", str(tmp_path / "k.npy"))
    assert r.exit_code == 3, r.output
    assert r.output.startswith(f"Error: {error} From the command line: a lower "
                               f"--memory-budget."), r.output

    def fail(self, x, y):
        raise errors.not_positive_definite("k_train_train + s I", "90 x 90, float64")

    monkeypatch.setattr(NTKRegressor, "fit", fail)
    out = tmp_path / "m.npz"
    r = invoke("fit", str(data["reg.npz"]), "--arch", ARCH, "-o", str(out))
    assert r.exit_code == 1, r.output
    assert ("Error: fitting reg.npz failed: k_train_train + s I is not positive definite"
            in r.output)
    assert "Fixes: add diag_reg" in r.output and r.output.rstrip().endswith(
        "From the command line: a larger --diag-reg, or --dtype float64.")
    assert "Traceback" not in r.output and not out.exists()


def test_torch_out_of_memory_is_a_memory_failure(data, tmp_path, monkeypatch):
    """torch's OutOfMemoryError (a RuntimeError, not a MemoryError) maps like MemoryError,
    with torch's first line."""
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    monkeypatch.setattr(_kernel, "architecture_arg", lambda spec: _FailingNet(error))
    r = invoke("kernel", ARCH, str(data["x.npy"]), "-o", str(tmp_path / "k.npy"))
    assert r.exit_code == 3, r.output
    assert "Error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB" in r.output
    assert "more" not in r.output


def test_a_bug_is_not_disguised(data, tmp_path, monkeypatch):
    """An exception outside the table (a bug) is not turned into an `Error:` line."""
    monkeypatch.setattr(_kernel, "architecture_arg",
                        lambda spec: _FailingNet(RuntimeError("internal")))
    r = invoke("kernel", ARCH, str(data["x.npy"]), "-o", str(tmp_path / "k.npy"))
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
    assert "Error:" not in r.output


def test_library_messages_are_not_rewritten():
    """No `.replace(` on an exception's text anywhere in the CLI (messages are composed
    from an error's fields, or printed as the library wrote them)."""
    for path in Path(cli.__file__).parent.glob("*.py"):
        body = path.read_text()
        assert not re.search(r"(str\(e\)|message|msg|reason)\)?\s*\.replace\(", body), path
