"""`nk.kernel_matrix`: tiles in-process and on Dask equal one call of the kernel; a run
killed mid-way (the whole process, or one Dask worker) gives the same matrix and computes
no finished tile again.

Witnesses: ``net.kernel`` over all inputs at once, ``nk.empirical_ntk`` and
``nk.monte_carlo_kernel`` on the whole batch, and the same matrix computed without
interruption. Tiles that were not recomputed are known from ``on_tile`` (what a call
computed), the on-disk done-mask at the kill, and a log each kernel call appends to.
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import TOL

import ntkit as nk
from ntkit.errors import StoreError

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

F64 = TOL[torch.float64]


def mlp():
    return nk.Sequential(nk.Linear(64, w_std=1.4, b_std=0.1), nk.ReLU(),
                         nk.Linear(64, w_std=1.4, b_std=0.1), nk.Erf(), nk.Linear(1))


def inputs(n: int, seed: int = 0, features: int = 5) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def make_kernel(log: str, delay: float):
    """A slow Gaussian kernel over features 1: that appends ``"row col time"`` to ``log``
    when it starts a tile; feature 0 of the inputs is the example's index."""
    import time

    import torch

    def slow_kernel(a, b):
        with open(log, "a") as f:
            f.write(f"{int(a[0, 0])} {int(b[0, 0])} {time.time()!r}\n")
        time.sleep(delay)
        return torch.exp(-((a[:, None, 1:] - b[None, :, 1:]) ** 2).sum(-1))

    return slow_kernel


def indexed_inputs(n: int) -> torch.Tensor:
    x = inputs(n, seed=3, features=3)
    x[:, 0] = torch.arange(n, dtype=x.dtype)
    return x


def started(log: Path) -> list[tuple[int, int, float]]:
    """The tiles a `make_kernel` kernel started, as (first row, first column, time)."""
    if not log.exists():
        return []
    return [(int(r), int(c), float(t)) for r, c, t in
            (line.split() for line in log.read_text().splitlines())]


def all_tiles(n: int, side: int) -> set[tuple[int, int]]:
    g = -(-n // side)
    return {(i, j) for i in range(g) for j in range(i, g)}


@pytest.fixture(scope="module")
def client():
    """A real two-process Dask cluster, shared by the tests that need one."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": ":0"}) as cluster, \
            distributed.Client(cluster) as c:
        yield c


# ------------------------------------------------------------- in-process
@pytest.mark.parametrize("case", ["symmetric-tile5", "x2-tile4x7", "symmetric-budget",
                                  "x2-one-tile"])
@pytest.mark.parametrize("get", ["ntk", "nngp"])
def test_in_process_equals_net_kernel(case, get):
    net = mlp()
    x1 = inputs(40)
    x2 = None if case.startswith("symmetric") else inputs(23, seed=1)
    tile = {"symmetric-tile5": 5, "x2-tile4x7": (4, 7), "symmetric-budget": None,
            "x2-one-tile": 100}[case]
    seen = []
    # 20 kB: tiles of 16, the smallest a network gets by default (40 = 16 + 16 + 8)
    k = nk.kernel_matrix(net, x1, x2, get=get, tile_size=tile, memory_budget="20kB",
                         on_tile=seen.append)
    want = getattr(net.kernel(x1, x2), get)
    torch.testing.assert_close(k, want, **F64)
    assert len(seen) == {"symmetric-tile5": 36, "x2-tile4x7": 40, "symmetric-budget": 6,
                         "x2-one-tile": 1}[case]
    assert len({t.index for t in seen}) == len(seen)
    assert all(t.where == "in-process" for t in seen)


def test_pooling_network_in_uneven_tiles():
    net = nk.Sequential(nk.Conv2d(8, 3, padding="same"), nk.ReLU(), nk.AvgPool2d(2),
                        nk.Conv2d(8, 3, padding="same"), nk.ReLU(), nk.GlobalAvgPool(),
                        nk.Linear(1))
    x = torch.randn(7, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(nk.kernel_matrix(net, x, tile_size=3), net.kernel(x).ntk, **F64)
    torch.testing.assert_close(nk.kernel_matrix(net, x[:5], x[2:], tile_size=(2, 4)),
                               net.kernel(x[:5], x[2:]).ntk, **F64)


def _calls_of(fn):
    """``fn`` and the list of ``(len(a), len(b))`` it is called with."""
    calls = []

    def counted(a, b):
        calls.append((len(a), len(b)))
        return fn(a, b)

    return counted, calls


@pytest.mark.parametrize("how", ["same", "view"])
def test_x_twice_is_the_symmetric_matrix(how, tmp_path):
    """``kernel_matrix(k, x, x)`` with one tensor twice (the object or a view of it) is ``kernel_matrix(k, x)``: bit for bit the same matrix from the same upper
    tiles (a general pair with x' one value off computes all of them), for a network
    and for a function; on disk it is recorded (and resumed) as the symmetric matrix."""
    net, x = mlp(), inputs(20)
    twice = {"same": x, "view": x.view(x.shape)}[how]
    once, twice_seen, other_seen = [], [], []
    want = nk.kernel_matrix(net, x, tile_size=6, on_tile=once.append)
    got = nk.kernel_matrix(net, x, twice, tile_size=6, on_tile=twice_seen.append)
    assert torch.equal(got, want)
    assert sorted(t.index for t in twice_seen) == sorted(t.index for t in once)
    assert len(once) == len(all_tiles(20, 6)) == 10
    other = x.clone()
    other[-1, -1] += 1
    nk.kernel_matrix(net, x, other, tile_size=6, on_tile=other_seen.append)
    assert len(other_seen) == 16
    copy_seen = []  # an equal copy is another tensor: a cross kernel, every tile computed
    copied = nk.kernel_matrix(net, x, x.clone(), tile_size=6, on_tile=copy_seen.append)
    assert len(copy_seen) == 16
    torch.testing.assert_close(copied, want, rtol=1e-5, atol=1e-6)

    fn, calls = _calls_of(lambda a, b: torch.exp(-torch.cdist(a, b) ** 2))
    k_fn = nk.kernel_matrix(fn, x, twice, tile_size=6)
    assert len(calls) == 10
    assert torch.equal(k_fn, nk.kernel_matrix(fn, x, tile_size=6))

    out = tmp_path / "k.zarr"
    stored = nk.write_kernel_matrix(net, x, twice, out=out, tile_size=6)
    assert stored.attrs["ntkit_kernel_matrix"]["x2"] is None
    resumed = []
    again = nk.kernel_matrix(net, x, out=out, on_tile=resumed.append)
    assert resumed == [] and torch.equal(again, want)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "x2"])
def test_empirical_kernel_function(symmetric):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 3)).double()
    x1, x2 = inputs(19), None if symmetric else inputs(11, seed=1)
    k = nk.kernel_matrix(lambda a, b: nk.empirical_ntk(model, a, b), x1, x2, tile_size=4)
    torch.testing.assert_close(k, nk.empirical_ntk(model, x1, x2), **F64)


def test_monte_carlo_kernel_function():
    """Seeded inside the function, every tile sees the same sampled networks."""
    net = nk.Sequential(nk.Linear(32), nk.ReLU(), nk.Linear(1))

    def mc(a, b):
        return nk.monte_carlo_kernel(net, a, b, n_samples=2,
                                     generator=torch.Generator().manual_seed(5)).ntk

    x1, x2 = inputs(9), inputs(6, seed=1)
    torch.testing.assert_close(nk.kernel_matrix(mc, x1, x2, tile_size=(4, 4)), mc(x1, x2),
                               **F64)


# ------------------------------------------------------------------- disk
def test_resume_computes_only_missing_tiles(tmp_path, capsys):
    net, x = mlp(), inputs(30)
    want = net.kernel(x).ntk
    out = tmp_path / "k.zarr"
    first = []

    def interrupt(tile):
        first.append(tile.index)
        if len(first) == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nk.kernel_matrix(net, x, out=out, tile_size=4, on_tile=interrupt)
    mask = zarr.open_group(str(out), mode="r")["done"][...]
    assert {tuple(map(int, t)) for t in zip(*mask.nonzero())} == set(first)

    second = []
    k = nk.kernel_matrix(net, x, out=out, on_tile=lambda t: second.append(t.index),
                         progress=True)  # the tile size is taken from out
    assert "12/36" in capsys.readouterr().err  # the bar starts at the finished tiles
    assert not set(first) & set(second)
    assert set(first) | set(second) == all_tiles(30, 4)
    torch.testing.assert_close(k, want, **F64)

    third = []
    again = nk.kernel_matrix(net, x, out=out, on_tile=third.append)
    assert third == [] and torch.equal(again, k)
    stored = nk.write_kernel_matrix(net, x, out=out)
    assert isinstance(stored, zarr.Array) and torch.equal(torch.from_numpy(stored[...]), k)


@pytest.mark.parametrize("change", ["x1", "x2", "network", "get", "key", "tile_size", "dtype"])
def test_resume_against_other_inputs_is_refused(tmp_path, change):
    net, x1, x2 = mlp(), inputs(10), inputs(6, seed=1)
    fn = make_kernel(str(tmp_path / "log"), 0.0)
    base = {"kernel": net, "x1": x1, "x2": x2, "tile_size": 4}
    if change == "key":
        base.update(kernel=fn, x1=indexed_inputs(10), x2=None, key="model-a")
    out = tmp_path / "k.zarr"
    nk.kernel_matrix(out=out, **base)
    changed = dict(base)
    changed.update({
        "x1": {"x1": x1 + 1e-9}, "x2": {"x2": x2[:5]},
        "network": {"kernel": nk.Sequential(nk.Linear(64, w_std=1.5, b_std=0.1), nk.ReLU(),
                                             nk.Linear(1))},
        "get": {"get": "nngp"}, "key": {"key": "model-b"}, "tile_size": {"tile_size": 5},
        "dtype": {"dtype": torch.float32},
    }[change])
    name = {"network": "kernel", "tile_size": "tile size"}.get(change, change)
    with pytest.raises(StoreError, match=f"different {name}.*overwrite=True") as refused:
        nk.kernel_matrix(out=out, **changed)
    assert (refused.value.path, refused.value.fix) == (out, "overwrite")
    assert refused.value.reason.startswith("holds a kernel matrix computed with a different")
    seen = []
    k = nk.kernel_matrix(out=out, overwrite=True, on_tile=seen.append, **changed)
    assert seen and not torch.isnan(k).any()


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a kernel matrix written by ntkit") as refused:
            nk.kernel_matrix(mlp(), inputs(4), out=tmp_path, overwrite=overwrite)
        assert (refused.value.path, refused.value.fix) == (tmp_path, "new_directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_killed_process_resumes_without_recomputing(tmp_path):
    """A process computing into out= is killed with SIGKILL mid-way; the resumed
    matrix is the uninterrupted one and no tile done before the kill runs again."""
    n, side = 30, 3
    out, log = tmp_path / "k.zarr", tmp_path / "killed.log"
    script = tmp_path / "run.py"
    script.write_text(
        "import torch, ntkit as nk\n" + textwrap.dedent(inspect.getsource(make_kernel))
        + textwrap.dedent(inspect.getsource(inputs)) + textwrap.dedent(
            inspect.getsource(indexed_inputs))
        + f"nk.kernel_matrix(make_kernel({str(log)!r}, 0.1), indexed_inputs({n}), "
          f"out={str(out)!r}, tile_size={side}, key='rbf')\n")
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            with _ignored_while_created():
                if zarr.open_group(str(out), mode="r")["done"][...].sum() >= 5:
                    break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    mask = zarr.open_group(str(out), mode="r")["done"][...]
    done = {tuple(map(int, t)) for t in zip(*mask.nonzero())}
    assert 5 <= len(done) < len(all_tiles(n, side))

    x = indexed_inputs(n)
    resumed, computed = tmp_path / "resumed.log", []
    k = nk.kernel_matrix(make_kernel(str(resumed), 0.0), x, out=out, key="rbf",
                         on_tile=lambda t: computed.append(t.index))
    assert not done & set(computed)
    assert done | set(computed) == all_tiles(n, side)
    assert {(r // side, c // side) for r, c, _ in started(resumed)} == set(computed)
    assert torch.equal(k, nk.kernel_matrix(make_kernel(str(tmp_path / "whole.log"), 0.0), x,
                                           tile_size=side))


class _ignored_while_created:
    """Suppresses the errors of reading a zarr store another process is still creating."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, (FileNotFoundError, KeyError, ValueError,
                                                      zarr.errors.BaseZarrError))


# ------------------------------------------------------------------- Dask
def test_dask_cluster_equals_single_process(client):
    net = mlp()
    x1, x2 = inputs(33), inputs(14, seed=1)
    for second in (None, x2):
        seen = []
        k = nk.kernel_matrix(net, x1, second, tile_size=6, client=client, on_tile=seen.append)
        torch.testing.assert_close(k, nk.kernel_matrix(net, x1, second, tile_size=6), **F64)
        assert {t.where for t in seen} <= set(client.scheduler_info()["workers"])
    assert torch.isfinite(k).all()


def test_n_workers_starts_a_cluster_for_the_call():
    """A closure over a torch model is shipped to two worker processes started for the call
    (the model's features' Gram matrix: a one-network NNGP)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 2)).double()
    x = inputs(13)
    seen = []
    k = nk.kernel_matrix(lambda a, b: model(a) @ model(b).T, x, tile_size=4, n_workers=2,
                         on_tile=seen.append)
    with torch.no_grad():
        torch.testing.assert_close(k, model(x) @ model(x).T, **F64)
    assert len(seen) == 10 and all(t.where.startswith("tcp://") for t in seen)


def test_killed_worker_gives_same_matrix_without_recomputing(client, tmp_path):
    """A Dask worker is killed by SIGKILL mid-run; Dask reruns what it lost, and no tile
    already stored runs again."""
    n, side = 24, 3
    x = indexed_inputs(n)
    log, out = tmp_path / "tiles.log", tmp_path / "k.zarr"
    before = client.run(os.getpid)
    stored, killed_at = [], []

    def kill_after_four(tile):
        stored.append(tile.index)
        if len(stored) == 4:
            killed_at.append(time.time())
            os.kill(next(iter(before.values())), signal.SIGKILL)

    k = nk.kernel_matrix(make_kernel(str(log), 0.25), x, out=out, client=client,
                         on_tile=kill_after_four, tile_size=side)
    client.wait_for_workers(2, timeout=60)
    assert set(client.run(os.getpid).values()) != set(before.values())  # one was replaced
    assert sorted(stored) == sorted(all_tiles(n, side))  # each tile stored once
    done_before = set(stored[:4])
    rerun = {(r // side, c // side) for r, c, t in started(log) if t > killed_at[0]}
    assert not done_before & rerun
    want = nk.kernel_matrix(make_kernel(str(tmp_path / "whole.log"), 0.0), x, tile_size=side)
    assert torch.equal(k, want)


def test_devices_start_one_pinned_worker_per_gpu(monkeypatch):
    """The devices= cluster, with torch told it has 3 GPUs (which this process sees as
    physical 4, 6, 7) and the workers told to compute on the CPU: one worker per requested
    device, each seeing only its own GPU."""
    module = importlib.import_module("ntkit.kernel_matrix._cluster")  # starts the clusters
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    monkeypatch.setattr(module, "GPU_WORKER_DEVICE", "cpu")

    def visible_gpu(a, b):
        import os
        import time

        time.sleep(0.05)
        assert torch.get_num_threads() == 1
        assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)  # see WORKER_ENVIRON
        return torch.full((len(a), len(b)), float(os.environ["CUDA_VISIBLE_DEVICES"]),
                          dtype=a.dtype, device=a.device)

    k = nk.kernel_matrix(visible_gpu, inputs(6), tile_size=1, devices=["cuda:1", "cuda:2"])
    assert set(k.unique().tolist()) == {6.0, 7.0}


# ----------------------------------------------------------------- errors
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("devices", [["cuda:0"], "all", ["cuda:0", "cuda:1"]])
def test_devices_without_cuda_are_refused(devices):
    with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is False.*n_workers"):
        nk.kernel_matrix(mlp(), inputs(4), devices=devices)


@pytest.mark.parametrize("call, error, match", [
    ({"devices": ["cpu"]}, ValueError, "CUDA devices with an index"),
    ({"devices": "cuda:0"}, TypeError, "a list such as"),
    ({"n_workers": 2, "client": object()}, ValueError, "at most one of client="),
    ({"n_workers": 0}, ValueError, "positive int"),
    ({"tile_size": (2, 3)}, ValueError, "square tiles"),
    ({"tile_size": 0}, ValueError, "positive int"),
    ({"get": "cov1"}, ValueError, "get must be 'ntk' .* or 'nngp'"),
    ({"dtype": torch.int64}, TypeError, "float32 or torch.float64"),
], ids=["cpu-device", "device-string", "client-and-workers", "zero-workers", "oblong-tiles",
        "zero-tile", "get", "dtype"])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        nk.kernel_matrix(mlp(), inputs(4), **call)


def test_bad_kernels():
    x = inputs(4)
    with pytest.raises(ValueError, match="get='nngp' picks"):
        nk.kernel_matrix(lambda a, b: a @ b.T, x, get="nngp")
    with pytest.raises(ValueError, match=r"shape \(Na, Nb\) = \(4, 4\).*got shape \(4,\)"):
        nk.kernel_matrix(lambda a, b: a.sum(1), x)
    with pytest.raises(TypeError, match="ntkit network or a function"):
        nk.kernel_matrix("rbf", x)
    spatial = nk.Sequential(nk.Conv1d(4, 3, padding="same"), nk.ReLU())
    with pytest.raises(ValueError, match="dense readout"):
        nk.kernel_matrix(spatial, torch.randn(3, 2, 5))
