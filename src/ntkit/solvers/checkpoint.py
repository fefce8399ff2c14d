"""Fits that survive a kill: FALKON's conjugate-gradient state checkpointed to disk.

``nystrom_krr(..., checkpoint=Checkpoint("fit.ckpt", every=5))`` (or just the path)
writes, before the first iteration, the preconditioner (the Cholesky factors ``T`` and
``A``), the right-hand side and the regulariser, and every ``every`` iterations the
state of the CG recursion (iterate ``x``, residual ``r``, preconditioned residual ``z``,
search direction ``p``, ``r.z``, the best iterate and the residual history). A fit
killed at any point (``kill -9`` included) and called again with the same arguments
resumes from the last checkpoint, losing at most ``every`` iterations, and returns
exactly (``torch.equal``) what the uninterrupted fit returns: the recursion continues
from the same numbers, with the same tiles in the same order.

The guarantees of kernel stores (`ntkit.kernel_matrix`):

- ntkit writes only into a new or empty directory, or one holding its own checkpoint
  (marker file `MARKER`); anything else is refused, and nothing but its own files is
  ever deleted.
- One writer at a time (the lock file of kernel stores, taken over from a dead process).
- Atomic: each state's arrays are written to new files (flushed to disk), then the
  manifest naming them and their SHA-256 replaces the old one by ``os.replace``; a kill
  leaves the old state or the new one, never a mixture. Every array is verified against
  its checksum when read back; a damaged checkpoint is refused, never used.
- Identity: the manifest records the training inputs and targets (SHA-256 of their
  bytes), the kernel's content fingerprint (or the caller's ``key`` for a kernel that
  is a Python function), the centres, and every setting that changes the numbers; a
  resume that differs in any of them is refused with a `CheckpointError` naming what
  differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import StoreError

__all__ = ["MARKER", "Checkpoint", "CheckpointError", "resumable_cg"]

#: The manifest of a checkpoint directory (its marker: a directory with this file, whose
#: ``"ntkit_checkpoint"`` field is the format, is ntkit's).
MARKER = "ntkit_checkpoint.json"
_FORMAT = 1
_PREFIX = "state-"


class CheckpointError(StoreError):
    """A checkpoint directory that cannot be used as asked (a `StoreError`)."""

    def __init__(self, path, reason: str, fix: str = ""):
        ValueError.__init__(self, f"checkpoint={str(path)!r} {reason}. {fix or _FIX}")
        self.path, self.reason, self.fix = path, reason, "checkpoint"


_FIX = ("Give another checkpoint directory, or delete this one to start the fit over "
        "(ntkit deletes nothing it did not write).")


@dataclass(frozen=True)
class Checkpoint:
    """Where and how often a fit checkpoints.

    Attributes:
        path: a directory (created if absent): new, empty, or an earlier checkpoint of
            the same fit (resumed).
        every: iterations between checkpoints (a resume loses at most this many).
        key: a string naming the kernel, required to resume a fit whose kernel is a
            Python function (whose code no fingerprint sees), as ``key=`` of kernel
            stores.
    """

    path: str | os.PathLike
    every: int = 5
    key: str | None = None

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Checkpoint.every must be a positive int (iterations between "
                             f"checkpoints), got {self.every!r}.")
        if self.key is not None and not isinstance(self.key, str):
            raise TypeError(f"Checkpoint.key must be a string, got {type(self.key).__name__}.")


def as_checkpoint(value: Any) -> Checkpoint | None:
    """``checkpoint=`` as a `Checkpoint` (a path becomes ``Checkpoint(path)``)."""
    if value is None or isinstance(value, Checkpoint):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Checkpoint(value)
    raise TypeError(f"checkpoint must be a directory (str or Path) or ntkit.solvers.Checkpoint, "
                    f"got {type(value).__name__}.")


def describe_tensor(x: Tensor) -> dict:
    """Shape, dtype and the SHA-256 of the bytes of ``x`` (for an identity)."""
    flat = x.detach().cpu().contiguous().reshape(-1)
    return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()}


class CheckpointStore:
    """A checkpoint directory opened for one fit (its lock held until `close`)."""

    def __init__(self, spec: Checkpoint, identity: dict):
        from ..kernel_matrix._lock import StoreLock

        self.path = Path(spec.path)
        self.every = spec.every
        self.identity = identity
        self._refuse_foreign()
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = StoreLock(self.path)
        self.lock.acquire()
        try:
            self._refuse_foreign()
            self.manifest = self._read_manifest()
            if self.manifest is not None:
                self._check_identity(self.manifest.get("identity", {}))
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        self.lock.release()

    # ------------------------------------------------------------------ reading
    def load(self, part: str) -> dict[str, Any] | None:
        """The stored ``part`` (``"setup"`` or ``"state"``): tensors verified against
        their checksums, scalars as stored; None when absent."""
        if self.manifest is None or part not in self.manifest:
            return None
        entry = self.manifest[part]
        out = dict(entry["scalars"])
        for name, meta in entry["tensors"].items():
            file = self.path / meta["file"]
            try:
                raw = file.read_bytes()
            except OSError as e:
                raise CheckpointError(self.path, f"misses {meta['file']} ({e})") from None
            if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
                raise CheckpointError(self.path, f"has {meta['file']} that does not match its "
                                      f"checksum (changed or damaged on disk)")
            out[name] = torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False))
        return out

    # ------------------------------------------------------------------ writing
    def save(self, part: str, tensors: dict[str, Tensor], scalars: dict[str, Any],
             tag: str) -> None:
        """Writes ``part`` atomically: new array files, then the manifest (``os.replace``),
        then removes the files of ``part``'s previous version."""
        entry = {"tensors": {}, "scalars": scalars}
        for name, t in tensors.items():
            buf = io.BytesIO()
            np.save(buf, t.detach().cpu().numpy(), allow_pickle=False)
            raw = buf.getvalue()
            file = f"{_PREFIX}{part}-{tag}-{name}.npy"
            _write_durably(self.path / file, raw)
            entry["tensors"][name] = {"file": file, "sha256": hashlib.sha256(raw).hexdigest()}
        old = (self.manifest or {}).get(part)
        manifest = dict(self.manifest or {"ntkit_checkpoint": _FORMAT,
                                          "identity": self.identity})
        manifest[part] = entry
        _write_durably(self.path / MARKER, json.dumps(manifest, indent=1).encode(),
                       atomic=True)
        self.manifest = manifest
        if old:
            keep = {m["file"] for m in entry["tensors"].values()}
            for meta in old["tensors"].values():
                if meta["file"] not in keep and meta["file"].startswith(_PREFIX):
                    with contextlib.suppress(OSError):
                        (self.path / meta["file"]).unlink()

    # ------------------------------------------------------------------ checks
    def _read_manifest(self) -> dict | None:
        file = self.path / MARKER
        if not file.exists():
            return None
        try:
            manifest = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(self.path, f"has an unreadable {MARKER} ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("ntkit_checkpoint") != _FORMAT:
            raise CheckpointError(self.path, f"has a {MARKER} that is not a checkpoint of "
                                  f"this ntkit (format {_FORMAT})")
        return manifest

    def _check_identity(self, stored: dict) -> None:
        callables = self.identity.get("callables")
        if callables and self.identity.get("key") is None:
            raise CheckpointError(self.path, f"holds a fit, but ntkit cannot tell whether it "
                                  f"is this kernel's: the kernel holds Python functions "
                                  f"({', '.join(callables)}) whose code no fingerprint sees",
                                  "Pass Checkpoint(path, key='...') naming the kernel (the "
                                  "same key as the fit that wrote it), or another directory.")
        differ = [f"{name} (stored: {_show(stored.get(name))}; now: {_show(value)})"
                  for name, value in self.identity.items() if stored.get(name) != value]
        if differ:
            raise CheckpointError(self.path, "holds a fit with a different " + "; ".join(differ)
                                  + ". Resuming would mix two fits")

    def _refuse_foreign(self) -> None:
        from ..kernel_matrix._lock import LOCK_NAME

        p = self.path
        if not p.exists() and not p.is_symlink():
            return
        if not p.is_dir():
            raise CheckpointError(p, "is a file, not a checkpoint directory")
        names = sorted(q.name for q in p.iterdir() if q.name != LOCK_NAME)
        if names and MARKER not in names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise CheckpointError(p, f"exists and holds files ({shown}) but no {MARKER}: it is "
                                  f"not a checkpoint written by ntkit, and ntkit does not write "
                                  f"into what it did not write", "Give a new or empty directory.")


def _write_durably(file: Path, data: bytes, atomic: bool = False) -> None:
    """Writes ``data`` and flushes it to disk; ``atomic``: through a temporary file and
    ``os.replace``, so readers see the old content or the new one."""
    target = file.with_name(file.name + ".tmp") if atomic else file
    with open(target, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, file)
        with contextlib.suppress(OSError):     # the rename itself, durably
            fd = os.open(file.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _show(value) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"shape {value.get('shape')} {value.get('dtype')}, sha256 {value['sha256'][:12]}..."
    return repr(value)


# ------------------------------------------------------------------ resumable CG
_STATE = ("x", "r", "z", "p", "rz", "best_x", "b_norm", "live")
_SCALARS = ("it", "residuals", "bests", "best")


def resumable_cg(matvec, b: Tensor, *, store: CheckpointStore, tol: float, max_iter: int,
                 stall_window: int = 100, on_failure: str = "raise",
                 progress: bool | None = None, what: str = "the linear system"):
    """`ntkit.solvers.conjugate_gradient` (no preconditioner, ``x0 = 0``, ``b`` ``(N, O)``)
    with its state (`ntkit.solvers.cg.CGState`) saved to ``store`` every ``store.every``
    iterations and after the last, and resumed from it: the same recursion
    (`cg_iterate`), so an uninterrupted and a resumed solve return equal tensors.

    Returns:
        ``(x, info)`` as `conjugate_gradient`.
    """
    from .cg import CGState, cg_finish, cg_iterate, cg_start

    def identity(r: Tensor) -> Tensor:
        return r

    def save(s: CGState) -> None:
        store.save("state", {k: getattr(s, k) for k in _STATE},
                   {k: getattr(s, k) for k in _SCALARS}, tag=str(s.it))

    saved = store.load("state")
    if saved is None:
        state = cg_start(matvec, b, identity)
        save(state)
    else:
        state = CGState(**{k: saved[k] for k in _STATE},
                        it=saved["it"], residuals=list(saved["residuals"]),
                        bests=list(saved["bests"]), best=saved["best"])

    def after_step(s: CGState, last: bool) -> None:
        if s.it % store.every == 0 or last:
            save(s)

    reason = cg_iterate(state, matvec, identity, b, tol=tol, max_iter=max_iter,
                        stall_window=stall_window, progress=progress, what=what,
                        after_step=after_step)
    return cg_finish(state, b, reason, tol=tol, on_failure=on_failure, what=what)
