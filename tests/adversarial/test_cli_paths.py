"""Hostile paths and outputs on the command line (issue 14, area C).

An output that is one of the inputs (the same path, ``./`` spelled, a symbolic or
hard link), an existing file without ``--force``, a write interrupted half way, a
kernel or prediction that came out NaN or infinite, inputs that overflow the
float32 cast, an unknown benchmark case, and every typed error of `ntkit.errors`:
each is refused with one ``Error:`` line and the right exit status, and no file
the user had is changed. In-process through click's CliRunner (no fresh torch
import per case).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ntkit import cli
from ntkit.cli import _errors, _kernel
from ntkit.spec import parse_architecture

ARCH = "linear(16)-relu-linear(1)"


def invoke(*args: str):
    return CliRunner().invoke(cli.cli, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(r, code: int) -> str:
    """The output of a refused command: exit ``code``, one ``Error:`` line, no traceback."""
    assert r.exit_code == code, r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, AssertionError)
    return r.output


def ntk_of(x: np.ndarray, dtype=torch.float32) -> np.ndarray:
    """The witness: the NTK by the Python API, not through the command line."""
    t = torch.as_tensor(x, dtype=dtype)
    return parse_architecture(ARCH).kernel(t).ntk.numpy()


@pytest.fixture()
def files(tmp_path, monkeypatch) -> dict[str, Path]:
    """In a fresh working directory: x.npy (12 x 3), x2.npy (4 x 3), train.npz (x, y:
    regression) and a JSON architecture."""
    monkeypatch.chdir(tmp_path)
    g = np.random.default_rng(0)
    x = g.standard_normal((12, 3))
    np.save("x.npy", x)
    np.save("x2.npy", g.standard_normal((4, 3)))
    np.savez("train.npz", x=x, y=np.sin(x[:, 0]))
    Path("net.json").write_text(json.dumps(["linear(16)", "relu", "linear(1)"]))
    return {p.stem if p.suffix != ".json" else "arch": tmp_path / p
            for p in map(Path, ("x.npy", "x2.npy", "train.npz", "net.json"))}


# ---------------------------------------------------------------- an output that is an input
def _link(kind: str, target: Path, at: Path) -> Path:
    if kind == "symlink":
        at.symlink_to(target)
    else:
        os.link(target, at)
    return at


@pytest.mark.parametrize("spelling", ["same", "dot_slash", "absolute", "symlink", "hardlink"])
def test_kernel_output_that_is_its_data_is_refused(spelling, files, tmp_path):
    """`ntkit kernel ARCH x.npy -o x.npy` (however the path is spelled, through links,
    and even with --force) exits 1 naming the input, and x.npy keeps its bytes."""
    x = files["x"]
    before = digest(x)
    out = {"same": "x.npy", "dot_slash": "./x.npy", "absolute": str(x)}.get(spelling)
    if out is None:
        out = str(_link(spelling, x, tmp_path / f"link-{spelling}.npy"))
    for force in ((), ("--force",)):
        r = invoke("kernel", ARCH, "x.npy", "-o", out, "--no-progress", *force)
        assert "is the input DATA" in one_error_line(r, 1)
        assert digest(x) == before


def test_kernel_output_that_is_another_input_is_refused(files):
    """-o naming --x2 is refused like DATA; an architecture file is .json/.yaml, which
    -o refuses as a kernel file (a usage error), so it is never written either."""
    before = digest(files["x2"])
    r = invoke("kernel", ARCH, "x.npy", "--x2", "x2.npy", "-o", "x2.npy", "--no-progress",
               "--force")
    assert "-o/--out x2.npy is the input --x2" in one_error_line(r, 1)
    assert digest(files["x2"]) == before
    arch = digest(files["arch"])
    r = invoke("kernel", "net.json", "x.npy", "-o", "net.json", "--no-progress", "--force")
    assert r.exit_code == 2 and "must end in .npy or .npz" in r.output
    assert digest(files["arch"]) == arch


def test_fit_output_that_is_its_training_data_is_refused(files):
    """`ntkit fit train.npz -o train.npz` and `--save-test train.npz` are refused before
    any fit; -o and --save-test may not be one file either."""
    before = digest(files["train"])
    r = invoke("fit", "train.npz", "--arch", ARCH, "-o", "train.npz", "--force")
    assert "-o/--out train.npz is the input DATA" in one_error_line(r, 1)
    r = invoke("fit", "train.npz", "--arch", ARCH, "-o", "m.npz", "--save-test", "./train.npz")
    assert "--save-test" in one_error_line(r, 1) and "is the input DATA" in r.output
    r = invoke("fit", "train.npz", "--arch", "net.json", "-o", "net.json")
    assert "is the input --arch" in one_error_line(r, 1)
    r = invoke("fit", "train.npz", "--arch", ARCH, "-o", "m.npz", "--save-test", "m.npz")
    assert "are the same file" in one_error_line(r, 1)
    assert digest(files["train"]) == before and not Path("m.npz").exists()


def test_predict_output_that_is_the_model_or_the_data_is_refused(files):
    """A model saved under a .npy name (save writes the name as given) is not replaced by
    its own predictions, nor the data by theirs; an existing -o needs --force."""
    r = invoke("fit", "train.npz", "--arch", ARCH, "-o", "m.npy", "--save-test", "test.npz")
    assert r.exit_code == 0, r.output
    model, test = digest(Path("m.npy")), digest(Path("test.npz"))
    r = invoke("predict", "m.npy", "test.npz", "-o", "./m.npy", "--force")
    assert "-o/--out m.npy is the input MODEL" in one_error_line(r, 1)
    r = invoke("predict", "m.npy", "x.npy", "-o", "x.npy", "--force")
    assert "is the input DATA" in one_error_line(r, 1)
    assert digest(Path("m.npy")) == model and digest(Path("test.npz")) == test
    # an existing output needs --force; with it, the predictions of the model
    np.save("p.npy", np.zeros(3))
    r = invoke("predict", "m.npy", "x.npy", "-o", "p.npy")
    assert "p.npy already exists; pass --force" in one_error_line(r, 1)
    assert np.array_equal(np.load("p.npy"), np.zeros(3))
    r = invoke("predict", "m.npy", "x.npy", "-o", "p.npy", "--force")
    assert r.exit_code == 0, r.output
    from ntkit.sklearn import load

    np.testing.assert_array_equal(np.load("p.npy"), load("m.npy").predict(np.load("x.npy")))


def test_store_that_holds_an_input_is_refused(files):
    """--store DIR writes DIR/ntk: a data file inside it is refused before any tile, with
    --overwrite (which would discard the folder) and --resume alike."""
    Path("tiles/ntk").mkdir(parents=True)
    np.save("tiles/ntk/x.npy", np.load("x.npy"))
    before = digest(Path("tiles/ntk/x.npy"))
    args = ("kernel", ARCH, "tiles/ntk/x.npy", "-o", "k.npy", "--store", "tiles",
            "--no-progress")
    assert "already exists; pass --resume" in one_error_line(invoke(*args), 1)
    for flag in ("--overwrite", "--resume"):
        r = invoke(*args, flag)
        assert "--store would write its arrays into tiles/ntk, which holds DATA" \
            in one_error_line(r, 1)
    assert digest(Path("tiles/ntk/x.npy")) == before
    assert sorted(p.name for p in Path("tiles/ntk").iterdir()) == ["x.npy"]


# ---------------------------------------------------------------- existing outputs, --force
def test_existing_output_needs_force(files):
    """An existing -o file is refused without --force (kept as it was), replaced with
    it, by the kernel the Python API computes."""
    np.save("k.npy", np.arange(3.0))
    r = invoke("kernel", ARCH, "x.npy", "-o", "k.npy", "--no-progress")
    assert "k.npy already exists; pass --force to replace it" in one_error_line(r, 1)
    assert np.array_equal(np.load("k.npy"), np.arange(3.0))
    r = invoke("kernel", ARCH, "x.npy", "-o", "k.npy", "--no-progress", "--force")
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load("k.npy"), ntk_of(np.load("x.npy")), rtol=1e-6,
                               atol=1e-6)
    r = invoke("fit", "train.npz", "--arch", ARCH, "-o", "k.npy")
    assert "k.npy already exists" in one_error_line(r, 1)


def test_interrupted_write_leaves_the_old_file(files, monkeypatch):
    """Ctrl-C while the kernel file is being written (after part of it): exit 130, the
    earlier file unchanged, and no temporary file left in the folder."""
    np.save("k.npy", np.arange(3.0))
    before = digest(Path("k.npy"))
    real_save = np.save

    def save_then_interrupt(file, arr, *args, **kwargs):
        real_save(file, arr[: len(arr) // 2], *args, **kwargs)       # half of it written
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save_then_interrupt)
    listing = sorted(p.name for p in Path(".").iterdir())
    r = invoke("kernel", ARCH, "x.npy", "-o", "k.npy", "--no-progress", "--force")
    assert "Error: interrupted." in one_error_line(r, 130)
    assert digest(Path("k.npy")) == before
    assert sorted(p.name for p in Path(".").iterdir()) == listing


# ---------------------------------------------------------------- non-finite results
def test_overflowing_kernel_is_not_written(files):
    """Inputs of magnitude 1e30 are finite in float32, but x . x / d overflows it: exit 1,
    no file. The same file in float64 gives the finite kernel of the Python API."""
    np.save("big.npy", np.load("x.npy") * 1e30)
    r = invoke("kernel", ARCH, "big.npy", "-o", "k.npy", "--no-progress")
    text = one_error_line(r, 1)
    assert "not finite" in text or "infinite" in text, text
    assert "does not fit the data" not in text and "--dtype float64" in text, text
    assert not Path("k.npy").exists()
    r = invoke("kernel", ARCH, "big.npy", "-o", "k.npy", "--no-progress", "--dtype", "float64")
    assert r.exit_code == 0, r.output
    k = np.load("k.npy")
    assert np.isfinite(k).all()
    np.testing.assert_allclose(k, ntk_of(np.load("big.npy"), torch.float64), rtol=1e-12)


class _NaNKernelNet:
    """A stand-in network whose kernels are ones with one NaN entry (row 0, last column)."""

    def kernel(self, x1, x2=None, **kwargs):
        n2 = len(x1) if x2 is None else len(x2)
        k = torch.ones(len(x1), n2, dtype=x1.dtype)
        k[0, -1] = float("nan")

        class K:
            nngp, ntk = k, k
        return K()


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_nan_kernel_is_not_written(suffix, files, monkeypatch):
    """The command line's own last look: a kernel with a NaN entry (even one the library
    did not flag) is not written, and the message counts it and says what to do."""
    monkeypatch.setattr(_kernel, "architecture_arg", lambda spec: _NaNKernelNet())
    r = invoke("kernel", ARCH, "x.npy", "-o", f"k{suffix}", "--no-progress")
    text = one_error_line(r, 1)
    assert "has 1 NaN entries of 144; nothing was written" in text
    assert "--dtype float64" in text and not Path(f"k{suffix}").exists()


def test_model_with_nan_coefficients_predicts_nothing(files):
    """A model file whose coefficients were replaced by NaN: exit 1, no predictions
    written (by the model file's check or the command line's)."""
    assert invoke("fit", "train.npz", "--arch", ARCH, "-o", "m.npz").exit_code == 0
    with np.load("m.npz") as z:
        arrays = dict(z)
    arrays["dual_coef_"] = np.full_like(arrays["dual_coef_"], np.nan)
    with open("bad.npz", "wb") as f:
        np.savez(f, **arrays)
    r = invoke("predict", "bad.npz", "x.npy", "-o", "p.npy")
    text = one_error_line(r, 1)
    assert "NaN" in text or "not finite" in text, text
    assert not Path("p.npy").exists()


# ---------------------------------------------------------------- the float32 cast
@pytest.mark.parametrize("command", ["kernel", "fit"])
def test_values_that_overflow_float32_are_named(command, files):
    """1e39 is finite in the file (float64) but not in float32: the message says the cast
    made it infinite and names --dtype float64 (not "x1 contains infinite values")."""
    x = np.load("x.npy")
    x[2, 1] = 1e39
    np.savez("huge.npz", x=x, y=np.sin(x[:, 0]))
    args = {"kernel": ("kernel", ARCH, "huge.npz", "-o", "k.npy", "--no-progress"),
            "fit": ("fit", "huge.npz", "--arch", ARCH, "--dtype", "float32", "--task",
                    "regress", "-o", "m.npz")}
    r = invoke(*args[command])
    text = one_error_line(r, 1)
    assert "the cast to float32 would make them infinite" in text
    assert "first 1e+39 at row 2, column 1" in text and "--dtype float64" in text
    assert not Path("k.npy").exists() and not Path("m.npz").exists()


# ---------------------------------------------------------------- bench, the error table
@pytest.mark.parametrize("args", [("nosuchcase",), ("fc", "--reps", "2", "nosuchcase")])
def test_bench_unknown_case_is_one_line(args):
    """An unknown case: exit 2, one line listing the valid cases (no script started: the
    case names are read from benchmarks/run.py's source)."""
    r = invoke("bench", *args)
    text = one_error_line(r, 2)
    assert "no benchmark case 'nosuchcase'; the cases are fc, cnn" in text


def _instance(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls`` whose message is "boom", whatever its constructor takes."""
    e = cls.__new__(cls)
    Exception.__init__(e, "boom")
    return e


class _FailingNet:
    def __init__(self, error):
        self.error = error

    def kernel(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("cls", _errors.library_errors(), ids=lambda c: c.__name__)
def test_every_library_error_is_one_line(cls, files, monkeypatch):
    """Each exception class defined in ntkit.errors (those added later too): one `Error:`
    line with its message, exit 1 (3 for the memory ones), never a traceback."""
    monkeypatch.setattr(_kernel, "architecture_arg", lambda spec: _FailingNet(_instance(cls)))
    r = invoke("kernel", ARCH, "x.npy", "-o", "k.npy", "--no-progress")
    assert "boom" in one_error_line(r, 3 if issubclass(cls, MemoryError) else 1)
    assert not Path("k.npy").exists()


@pytest.mark.parametrize("budget", ["1e400GB", "-1GB", "nan", "inf", "GB", "0", "1" * 400])
def test_hostile_memory_budget_is_a_usage_error(budget, files):
    """--memory-budget goes through ntkit.parse_memory: an overflowing, negative, NaN,
    infinite, unitless-empty or zero size is a usage error (exit 2) before any work, and
    parse_memory itself raises ValueError for it (2GiB, the witness, is 2 * 1024**3)."""
    from ntkit import parse_memory

    assert parse_memory("2GiB") == 2 * 1024 ** 3
    with pytest.raises(ValueError, match="memory_budget"):
        parse_memory(budget)
    r = invoke("kernel", ARCH, "x.npy", "-o", "k.npy", "--memory-budget", budget)
    assert r.exit_code == 2 and "--memory-budget" in r.output, r.output
    assert "Traceback" not in r.output and not Path("k.npy").exists()


def test_demo_refuses_a_file_as_its_folder(files):
    """`ntkit demo --out x.npy` (a data file, where the figures' folder goes) is a usage
    error and the file keeps its bytes; so is a width that is no number."""
    before = digest(files["x"])
    r = invoke("demo", "--quick", "--out", "x.npy")
    assert r.exit_code == 2 and "x.npy" in r.output and "is a file" in r.output, r.output
    assert digest(files["x"]) == before
    r = invoke("demo", "--widths", "64,1e999")
    assert r.exit_code == 2 and "'1e999' is not an integer width" in r.output, r.output
