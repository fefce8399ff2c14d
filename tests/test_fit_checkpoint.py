"""A FALKON fit that survives a kill: checkpointed CG state, resumed after SIGKILL to
exactly (torch.equal) the uninterrupted result; refusals of other data, settings,
foreign folders and damaged checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ntkit as nk
from ntkit import solvers
from ntkit.solvers import _falkon_tiles
from ntkit.solvers.checkpoint import MARKER, Checkpoint, CheckpointError

F64 = torch.float64
# the fits stop at max_iter on purpose (a fixed number of iterations to interrupt)
pytestmark = pytest.mark.filterwarnings("ignore::ntkit.errors.ConvergenceWarning")

# The fit, shared by this process and the child that is killed: float64, one thread
# (the same kernel rounding in both processes), many small tiles.
SETUP = """
import torch, ntkit as nk
from ntkit import solvers
torch.set_num_threads(1)
N, M = {n}, {m}
gen = torch.Generator().manual_seed(0)
x = torch.randn(N, 5, generator=gen, dtype=torch.float64)
y = torch.sin(x[:, :1]) + 0.1 * torch.randn(N, 1, generator=gen, dtype=torch.float64)
net = nk.Sequential(nk.Linear(64, w_std=1.5, b_std=0.1), nk.ReLU(), nk.Linear(1, w_std=1.5))
kfn = solvers.kernel_function(net, "ntk")
OPTS = dict(n_centers=M, diag_reg=1e-6, tol=1e-13, max_iter={iters}, on_failure="warn",
            memory_budget=8 * 8 * M * 200)

def fit(checkpoint, **kw):
    return solvers.nystrom_krr(kfn, x, y, generator=torch.Generator().manual_seed(1),
                               checkpoint=checkpoint, **{{**OPTS, **kw}})
"""


def _namespace(n=400, m=60, iters=30):
    ns: dict = {}
    exec(SETUP.format(n=n, m=m, iters=iters), ns)  # noqa: S102 - the child runs this same text
    return ns


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _saved_iteration(path) -> int | None:
    try:
        manifest = json.loads((path / MARKER).read_text())
        return manifest["state"]["scalars"]["it"]
    except (OSError, ValueError, KeyError):
        return None


def test_checkpointed_fit_equals_the_plain_fit(tmp_path, one_thread):
    ns = _namespace()
    plain = ns["fit"](None)
    ckpt = ns["fit"](Checkpoint(tmp_path / "c", every=3))
    assert torch.equal(ckpt.alpha, plain.alpha)
    assert ckpt.info == plain.info
    # a finished checkpoint: called again, the same result without one kernel pass
    again = ns["fit"](Checkpoint(tmp_path / "c", every=3))
    assert torch.equal(again.alpha, plain.alpha)


def test_sigkill_mid_fit_then_resume_is_exact(tmp_path, monkeypatch, one_thread):
    n, m, iters, every = 3000, 150, 40, 2
    path = tmp_path / "fit.ckpt"
    script = SETUP.format(n=n, m=m, iters=iters) + textwrap.dedent(f"""
        fit(solvers.Checkpoint({str(path)!r}, every={every}))
        print("finished")
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while (_saved_iteration(path) or 0) < 6 and child.poll() is None:
        assert time.monotonic() < deadline, "the child never checkpointed iteration 6"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    out, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, (out, err[-2000:])
    saved = _saved_iteration(path)
    assert saved is not None and saved >= 6 and saved % every == 0

    ns = _namespace(n, m, iters)
    passes = {"square": 0, "rhs": 0}
    square, rhs = _falkon_tiles.RowTiles.knm_t_knm, _falkon_tiles.RowTiles.knm_t

    def counted_square(self, u):
        passes["square"] += 1
        return square(self, u)

    def counted_rhs(self, v):
        passes["rhs"] += 1
        return rhs(self, v)

    monkeypatch.setattr(_falkon_tiles.RowTiles, "knm_t_knm", counted_square)
    monkeypatch.setattr(_falkon_tiles.RowTiles, "knm_t", counted_rhs)
    resumed = ns["fit"](solvers.Checkpoint(path, every=every))
    # only the iterations after the last checkpoint were computed again
    assert passes == {"square": resumed.info.iterations - saved, "rhs": 0}
    assert resumed.info.iterations > saved
    monkeypatch.undo()
    uninterrupted = ns["fit"](solvers.Checkpoint(tmp_path / "fresh", every=every))
    assert torch.equal(resumed.alpha, uninterrupted.alpha)
    assert resumed.info == uninterrupted.info


@pytest.mark.parametrize("change,named", [
    (lambda ns: {"y": ns["y"] + 1e-9}, "y_train"),
    (lambda ns: {"x": ns["x"].clone().index_fill_(0, torch.tensor([0]), 0.0)}, "x_train"),
    (lambda ns: {"diag_reg": 1e-5}, "diag_reg"),
    (lambda ns: {"tol": 1e-8}, "tol"),
    (lambda ns: {"generator": torch.Generator().manual_seed(7)}, "centers"),
    (lambda ns: {"kfn": solvers.kernel_function(
        nk.Sequential(nk.Linear(64, w_std=1.5, b_std=0.2), nk.ReLU(), nk.Linear(1, w_std=1.5)),
        "ntk")}, "kernel"),
], ids=["targets", "inputs", "diag_reg", "tol", "centres", "network"])
def test_resume_with_other_data_or_settings_is_refused(tmp_path, change, named):
    ns = _namespace(n=200, m=30, iters=5)
    path = tmp_path / "c"
    ns["fit"](path)
    args = {"kfn": ns["kfn"], "x": ns["x"], "y": ns["y"], **ns["OPTS"],
            "generator": torch.Generator().manual_seed(1), **change(ns)}
    kfn, x, y = args.pop("kfn"), args.pop("x"), args.pop("y")
    with pytest.raises(CheckpointError, match=named):
        solvers.nystrom_krr(kfn, x, y, checkpoint=path, **args)


def test_foreign_folder_is_refused_and_left_alone(tmp_path):
    ns = _namespace(n=200, m=30, iters=5)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a checkpoint written by ntkit"):
        ns["fit"](tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        ns["fit"](file)


def test_damaged_checkpoint_is_refused(tmp_path):
    ns = _namespace(n=200, m=30, iters=5)
    path = tmp_path / "c"
    ns["fit"](path)
    manifest = json.loads((path / MARKER).read_text())
    victim = path / manifest["state"]["tensors"]["p"]["file"]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        ns["fit"](path)


def test_function_kernel_resumes_only_under_a_key(tmp_path):
    ns = _namespace(n=200, m=30, iters=5)
    kfn = ns["kfn"]

    def my_kernel(a, b):
        return kfn(a, b)

    opts = {**ns["OPTS"], "generator": torch.Generator().manual_seed(1)}
    first = solvers.nystrom_krr(my_kernel, ns["x"], ns["y"], checkpoint=tmp_path / "a", **opts)
    opts["generator"] = torch.Generator().manual_seed(1)
    with pytest.raises(CheckpointError, match="key="):
        solvers.nystrom_krr(my_kernel, ns["x"], ns["y"], checkpoint=tmp_path / "a", **opts)
    keyed = Checkpoint(tmp_path / "b", key="two-layer relu ntk")
    opts["generator"] = torch.Generator().manual_seed(1)
    solvers.nystrom_krr(my_kernel, ns["x"], ns["y"], checkpoint=keyed, **opts)
    opts["generator"] = torch.Generator().manual_seed(1)
    again = solvers.nystrom_krr(my_kernel, ns["x"], ns["y"], checkpoint=keyed, **opts)
    assert torch.equal(again.alpha, first.alpha)


@pytest.mark.parametrize("bad,error,match", [
    (lambda: 3, TypeError, "checkpoint must be a directory"),
    (lambda: Checkpoint("x", every=0), ValueError, "every"),
    (lambda: Checkpoint("x", key=5), TypeError, "key"),
], ids=["type", "every", "key"])
def test_bad_checkpoint_arguments(bad, error, match):
    ns = _namespace(n=50, m=10, iters=2)
    with pytest.raises(error, match=match):
        ns["fit"](bad())


def test_lock_refuses_a_second_writer(tmp_path):
    from ntkit.kernel_matrix._lock import StoreLock

    ns = _namespace(n=50, m=10, iters=2)
    path = tmp_path / "c"
    path.mkdir()
    lock = StoreLock(path)
    lock.acquire()
    try:
        with pytest.raises(Exception, match="lock|writer|held"):
            ns["fit"](path)
    finally:
        lock.release()
    assert os.listdir(path) == []
