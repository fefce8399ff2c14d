"""Hostile stores for `nk.kernel_matrix(..., out=)`: folders ntkit did not write,
kernels that print alike, two writers, damaged chunks and non-finite tiles.

Each case failed before issue 14 (a user's zarr group was reopened with mode "w",
stores were identified by ``repr``, nothing locked or checked a store). Witnesses:
the files a user wrote (read back byte for byte), ``net.kernel`` over all inputs at
once, the tiles a call computed (``on_tile``), and the lock file on disk.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit as nk
from ntkit.errors import NonFiniteError, StoreError
from ntkit.kernel_matrix._identity import fingerprint

zarr = pytest.importorskip("zarr")

LOCK = "ntkit.lock"
F64 = {"rtol": 1e-6, "atol": 1e-12}


def net(*middle) -> nk.Sequential:
    return nk.Sequential(nk.Linear(16, w_std=1.3, b_std=0.1), *(middle or (nk.ReLU(),)),
                         nk.Linear(1))


def inputs(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def rbf(a, b):
    return torch.exp(-torch.cdist(a, b) ** 2)


def slow(a, b):
    """`rbf` under the name of the slow kernel a second process writes with (a kernel
    function is known by its qualified name and key)."""
    return rbf(a, b)


def done_tiles(out: Path) -> set[tuple[int, int]]:
    mask = zarr.open_group(str(out), mode="r")["done"][...]
    return {(int(i), int(j)) for i, j in zip(*mask.nonzero())}


# ------------------------------------------------- folders ntkit did not write
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_users_zarr_group_is_never_deleted(tmp_path, overwrite):
    """A user's zarr group (no ``kernel`` array, no marker) was reopened with mode "w"
    and emptied; now it is refused and every array and file in it is intact."""
    out = tmp_path / "d.zarr"
    group = zarr.open_group(str(out), mode="w")
    group.create_array("weights", data=np.arange(6.0).reshape(2, 3))
    (out / "README").write_text("my data")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="without ntkit's marker") as refused:
        nk.kernel_matrix(net(), inputs(4), out=out, overwrite=overwrite)
    assert refused.value.fix == "new_directory"
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing deleted, nothing added (no lock file either)
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["weights"][...],
                                  np.arange(6.0).reshape(2, 3))


def test_users_zarr_group_with_a_kernel_array_is_refused(tmp_path):
    """A zarr group with an array named ``kernel`` that ntkit did not write."""
    out = tmp_path / "k.zarr"
    zarr.open_group(str(out), mode="w").create_array("kernel", data=np.ones((4, 4)))
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a kernel matrix written by ntkit"):
            nk.kernel_matrix(net(), inputs(4), out=out, overwrite=overwrite)
    np.testing.assert_array_equal(zarr.open_array(str(out / "kernel"), mode="r")[...],
                                  np.ones((4, 4)))


def test_a_file_is_refused(tmp_path):
    out = tmp_path / "k.zarr"
    out.write_bytes(b"not a folder")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=r"is a file"):
            nk.kernel_matrix(net(), inputs(4), out=out, overwrite=overwrite)
    assert out.read_bytes() == b"not a folder"


def test_overwrite_deletes_only_ntkits_entries(tmp_path):
    """overwrite=True on an ntkit store starts it over and leaves a user's file in it."""
    out, x = tmp_path / "k.zarr", inputs(6)
    nk.kernel_matrix(net(), x, out=out, tile_size=3)
    (out / "notes.txt").write_text("kept")
    other = net(nk.Erf())
    seen = []
    k = nk.kernel_matrix(other, x, out=out, overwrite=True, tile_size=3, on_tile=seen.append)
    assert (out / "notes.txt").read_text() == "kept"
    assert len(seen) == 3
    torch.testing.assert_close(k, other.kernel(x).ntk, **F64)
    assert not (out / LOCK).exists()


# ------------------------------------------------------ identity from content
def _refused_second(tmp_path, first, second, x, **kwargs) -> StoreError:
    out = tmp_path / "k.zarr"
    nk.kernel_matrix(first, x, out=out, tile_size=4, **kwargs)
    with pytest.raises(StoreError) as refused:
        nk.kernel_matrix(second, x, out=out, tile_size=4, **kwargs)
    return refused.value


def test_elementwise_lambdas_need_a_key(tmp_path):
    """Two Elementwise lambdas print alike (``Elementwise(<lambda>)``) and used to resume
    into each other; their code is not in the fingerprint, so a resume needs key=."""
    x = inputs()
    first = net(nk.Elementwise(lambda z: torch.tanh(z), degree=20))
    second = net(nk.Elementwise(lambda z: torch.sin(z), degree=20))
    assert repr(first) == repr(second)
    refused = _refused_second(tmp_path, first, second, x)
    assert refused.fix == "key" and "key=" in str(refused) and "<lambda>" in str(refused)
    # the same network resumed without a key: refused too (its identity is not defined)
    with pytest.raises(StoreError, match="key="):
        nk.kernel_matrix(first, x, out=tmp_path / "k.zarr", tile_size=4)
    # with keys: different keys are different kernels, the same key resumes
    keyed = tmp_path / "keyed.zarr"
    want = nk.kernel_matrix(first, x, out=keyed, key="tanh", tile_size=4)
    with pytest.raises(StoreError, match="different key") as other_key:
        nk.kernel_matrix(second, x, out=keyed, key="sin", tile_size=4)
    assert other_key.value.fix == "overwrite"
    seen = []
    k = nk.kernel_matrix(first, x, out=keyed, key="tanh", on_tile=seen.append)
    assert seen == [] and torch.equal(k, want)
    torch.testing.assert_close(k, first.kernel(x).ntk, rtol=1e-4, atol=1e-8)  # quadrature


@pytest.mark.parametrize("pair", ["count_include_pad", "sixth_decimal", "degree",
                                  "twelfth_decimal", "same_repr"])
def test_networks_differing_in_content_are_not_resumed(tmp_path, pair, monkeypatch):
    """Networks differing in a flag, a hyperparameter's 6th decimal or a quadrature degree
    have different fingerprints and are refused as different kernels, also when their
    reprs print alike (``same_repr``: a repr that leaves a hyperparameter out, as
    ``AvgPool`` and four-decimal reprs did)."""
    if pair == "same_repr":
        monkeypatch.setattr(nk.Erf, "__repr__", lambda self: "Erf()")
        pair = "sixth_decimal"
    if pair == "count_include_pad":
        x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
        a, b = (nk.Sequential(nk.Conv2d(4, 3, padding="same"), nk.ReLU(),
                              nk.AvgPool2d(2, padding=1, count_include_pad=flag), nk.Flatten(),
                              nk.Linear(1)) for flag in (True, False))
    else:
        x = inputs()
        a, b = {
            "sixth_decimal": (net(nk.Erf(a=1.000001)), net(nk.Erf(a=1.000002))),
            "degree": (net(nk.Elementwise(torch.tanh, degree=20)),
                       net(nk.Elementwise(torch.tanh, degree=21))),
            "twelfth_decimal": (nk.Sequential(nk.Linear(16, w_std=1.3, b_std=0.1), nk.ReLU(),
                                     nk.Linear(1, w_std=1.0 + 1e-12)), net()),
        }[pair]
    assert fingerprint(a) != fingerprint(b)
    refused = _refused_second(tmp_path, a, b, x)
    assert refused.fix == "overwrite" and "different kernel" in str(refused)
    assert not torch.equal(a.kernel(x).ntk, b.kernel(x).ntk)  # they are different kernels


def test_equal_networks_built_twice_resume(tmp_path):
    """Content identity, not object identity: a network rebuilt from the same arguments
    (and one already used for other kernels) resumes the store and computes nothing."""
    x, out = inputs(), tmp_path / "k.zarr"
    nk.kernel_matrix(net(nk.Erf(a=1.25)), x, out=out, tile_size=4)
    used = net(nk.Erf(a=1.25))
    used.kernel(inputs(3, seed=5))
    seen = []
    k = nk.kernel_matrix(used, x, out=out, on_tile=seen.append)
    assert seen == []
    torch.testing.assert_close(k, used.kernel(x).ntk, **F64)


def test_two_kernel_functions_without_key_are_never_mixed(tmp_path):
    """Two lambdas (same qualified name) without key: the second used to resume into the
    first's tiles and return its matrix."""
    x = inputs()
    refused = _refused_second(tmp_path, lambda a, b: rbf(a, b), lambda a, b: a @ b.T, x)
    assert refused.fix == "key"


# -------------------------------------------------------------- one writer
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out: Path, pid: int, host: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": host, "started": "earlier",
                                        "token": "theirs"}))


def test_second_writer_in_this_process_is_refused(tmp_path):
    """While a call writes the store (here: inside its on_tile), a second call, with or
    without overwrite=True, is refused naming the lock; the first finishes correctly
    and releases the lock."""
    out, x = tmp_path / "k.zarr", inputs()
    refusals = []

    def second_writer(tile):
        if not refusals:
            assert (out / LOCK).exists()
            for overwrite in (False, True):
                with pytest.raises(StoreError, match=r"ntkit\.lock.*held by process") as e:
                    nk.kernel_matrix(net(), x, out=out, overwrite=overwrite, tile_size=4)
                refusals.append(e.value.fix)

    k = nk.kernel_matrix(net(), x, out=out, tile_size=4, on_tile=second_writer)
    assert refusals == ["lock", "lock"]
    torch.testing.assert_close(k, net().kernel(x).ntk, **F64)
    assert not (out / LOCK).exists()


def test_lock_is_released_on_exception(tmp_path):
    out = tmp_path / "k.zarr"

    def stop(tile):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nk.kernel_matrix(net(), inputs(), out=out, tile_size=4, on_tile=stop)
    assert not (out / LOCK).exists() and len(done_tiles(out)) == 1


@pytest.mark.parametrize("holder", ["live-here", "other-host"])
def test_a_held_lock_refuses(tmp_path, holder):
    """A lock of a running process of this host, or of any process of another host (which
    cannot be checked from here), refuses the store and says how to clear it."""
    out = tmp_path / "k.zarr"
    nk.kernel_matrix(net(), inputs(), out=out, tile_size=4)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid, host = ((live.pid, socket.gethostname()) if holder == "live-here"
                     else (_dead_pid(), "elsewhere.example"))
        _write_lock(out, pid, host)
        with pytest.raises(StoreError, match=f"process {pid} on host {host}.*delete the lock "
                                             f"file") as refused:
            nk.kernel_matrix(net(), inputs(), out=out, overwrite=True)
    finally:
        live.kill()
        live.wait()
    assert refused.value.fix == "lock" and str(out / LOCK) in str(refused.value)
    assert json.loads((out / LOCK).read_text())["token"] == "theirs"  # left in place


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out, x = tmp_path / "k.zarr", inputs()
    _write_lock(out, _dead_pid(), socket.gethostname())
    k = nk.kernel_matrix(net(), x, out=out, tile_size=4)
    torch.testing.assert_close(k, net().kernel(x).ntk, **F64)
    assert not (out / LOCK).exists()


def test_writer_in_another_process_is_not_disturbed(tmp_path):
    """A second process writes slowly into the store; overwrite=True from here (which used
    to delete its tiles mid-run) is refused, and its matrix comes out whole."""
    out, n = tmp_path / "k.zarr", 8
    script = (
        "import time, torch, ntkit as nk\n"
        "def slow(a, b):\n"
        "    time.sleep(0.2)\n"
        "    return torch.exp(-torch.cdist(a, b) ** 2)\n"
        f"x = torch.randn({n}, 3, generator=torch.Generator().manual_seed(0), "
        "dtype=torch.float64)\n"
        f"nk.kernel_matrix(slow, x, out={str(out)!r}, tile_size=2, key='rbf')\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        x = inputs(n)
        with pytest.raises(StoreError, match="ntkit.lock") as refused:
            nk.kernel_matrix(slow, x, out=out, tile_size=2, key="rbf", overwrite=True)
        assert refused.value.fix == "lock"
    finally:
        assert proc.wait(timeout=90) == 0, proc.stderr.read().decode()[-2000:]
    seen = []
    k = nk.kernel_matrix(slow, x, out=out, key="rbf", on_tile=seen.append)
    assert seen == [] and not (out / LOCK).exists()
    torch.testing.assert_close(k, rbf(x, x), **F64)


# ------------------------------------------------------ damaged tiles, NaN
def _chunk(out: Path, i: int, j: int) -> Path:
    return out / "kernel" / "c" / str(i) / str(j)


@pytest.mark.parametrize("damage", ["deleted", "zeroed", "swapped", "garbage", "mirror",
                                    "checksum"])
def test_damaged_chunk_is_recomputed_on_resume(tmp_path, damage):
    """A finished store whose chunk file is deleted (read back as NaN), replaced by other
    valid bytes, or truncated: the resume recomputes exactly the damaged tile and returns
    the right matrix (it used to return the NaN or the other values)."""
    out, x = tmp_path / "k.zarr", inputs(12)
    nk.kernel_matrix(net(), x, out=out, tile_size=4)  # 3 x 3 tiles, 6 computed
    target = _chunk(out, 0, 1)
    if damage == "deleted":
        target.unlink()
    elif damage == "zeroed":
        target.write_bytes(bytes(len(target.read_bytes())))
    elif damage == "swapped":
        target.write_bytes(_chunk(out, 1, 2).read_bytes())
    elif damage == "garbage":
        target.write_bytes(b"garbage")
    elif damage == "checksum":  # the tile's checksum chunk, not its values
        (out / "checksum" / "c" / "0" / "1" / "0").write_bytes(b"garbage")
    else:
        target = _chunk(out, 1, 0)  # the mirror of tile (0, 1), below the diagonal
        target.write_bytes(bytes(len(target.read_bytes())))
    seen = []
    k = nk.kernel_matrix(net(), x, out=out, on_tile=seen.append)
    assert [t.index for t in seen] == [(0, 1)]
    torch.testing.assert_close(k, net().kernel(x).ntk, **F64)


def test_damage_after_the_run_raises_naming_the_tile(tmp_path):
    """A chunk changed on disk while the run goes on (here: by on_tile, after a tile was
    verified and stored) is caught on the final read: a StoreError naming the tile,
    never a matrix with it; calling again repairs it."""
    out, x = tmp_path / "k.zarr", inputs(12)
    stored = []

    def damage_first(tile):
        stored.append(tile)
        if len(stored) == 2:  # the first tile stored, zeroed on disk
            i, j = stored[0].index
            _chunk(out, i, j).write_bytes(bytes(len(_chunk(out, i, j).read_bytes())))

    with pytest.raises(StoreError) as refused:
        nk.kernel_matrix(net(), x, out=out, tile_size=4, on_tile=damage_first)
    first = stored[0]
    assert (f"{first.index} (rows {first.rows[0]}:{first.rows[1]}, columns "
            f"{first.cols[0]}:{first.cols[1]})") in str(refused.value)
    assert refused.value.fix == "resume" and len(stored) == 6
    seen = []
    k = nk.kernel_matrix(net(), x, out=out, on_tile=seen.append)
    assert [t.index for t in seen] == [first.index]
    torch.testing.assert_close(k, net().kernel(x).ntk, **F64)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_tile_is_never_stored(tmp_path, value):
    """A kernel function returning NaN (or inf) for one tile used to be stored, marked done
    and returned; now it raises naming the tile, and that tile is not marked done."""
    out, x = tmp_path / "k.zarr", inputs(8)
    fixed = []

    def broken(a, b):
        k = rbf(a, b)
        if not fixed and torch.equal(b, x[4:8]) and torch.equal(a, x[0:4]):
            k[1, 2] = value
        return k

    with pytest.raises(NonFiniteError, match=r"tile \(0, 1\) \(rows 0:4 of x1, columns 4:8"):
        nk.kernel_matrix(broken, x, out=out, tile_size=4, key="rbf")
    assert (0, 1) not in done_tiles(out)
    with pytest.raises(NonFiniteError, match=r"tile \(0, 1\)"):
        nk.kernel_matrix(broken, x, tile_size=4)  # in memory alike
    fixed.append(True)
    seen = []
    k = nk.kernel_matrix(broken, x, out=out, key="rbf", on_tile=seen.append)
    assert (0, 1) in {t.index for t in seen}
    torch.testing.assert_close(k, rbf(x, x), **F64)


# ------------------------------------------------------ write_kernel_matrix
@pytest.mark.parametrize("case", ["foreign", "lock", "damaged", "non-finite"])
def test_write_kernel_matrix_keeps_the_guarantees(tmp_path, case):
    """The disk-only call refuses a user's group and a held lock, recomputes a damaged
    chunk on resume, never stores a non-finite tile, and releases its lock."""
    out, x = tmp_path / "k.zarr", inputs(8)
    if case == "foreign":
        zarr.open_group(str(out), mode="w").create_array("mine", data=np.arange(3.0))
        with pytest.raises(StoreError, match="without ntkit's marker"):
            nk.write_kernel_matrix(net(), x, out=out, overwrite=True)
        np.testing.assert_array_equal(zarr.open_array(str(out / "mine"))[...], np.arange(3.0))
        return
    if case == "non-finite":
        with pytest.raises(NonFiniteError, match=r"tile \(\d, \d\)"):
            nk.write_kernel_matrix(lambda a, b: rbf(a, b) / 0.0, x, out=out, tile_size=4)
        assert done_tiles(out) == set() and not (out / LOCK).exists()
        return
    nk.write_kernel_matrix(net(), x, out=out, tile_size=4)
    if case == "lock":
        _write_lock(out, os.getppid(), socket.gethostname())  # a live process: the parent
        with pytest.raises(StoreError, match="ntkit.lock"):
            nk.write_kernel_matrix(net(), x, out=out)
        return
    _chunk(out, 1, 1).unlink()
    seen = []
    stored = nk.write_kernel_matrix(net(), x, out=out, on_tile=seen.append)
    assert [t.index for t in seen] == [(1, 1)] and not (out / LOCK).exists()
    torch.testing.assert_close(torch.from_numpy(stored[...]), net().kernel(x).ntk, **F64)
