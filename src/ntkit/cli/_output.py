"""Output files of the ``ntkit`` commands: never an input, never replaced unasked,
never half-written, never non-finite.

- `check_outputs`: refuses an output path that is one of the command's inputs (the
  same file, by `os.path.samefile` when it exists and by resolved path otherwise, or
  a file inside a ``--store`` directory), two outputs that are one file, and an
  existing output file unless ``--force`` is given.
- `write_atomically`: writes to a temporary file in the output's folder and moves it
  into place with `os.replace`, so a failure (a full disk, Ctrl-C) leaves the
  earlier file, or none, and never a truncated one.
- `check_finite`: refuses to write arrays holding NaN or infinite values (the
  library raises `ntkit.errors.NonFiniteError` where it checks its own results;
  this is the command line's last look before a file is written).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ._errors import CommandError

__all__ = ["check_finite", "check_outputs", "file_or_none", "same_path", "write_atomically"]


def same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: `os.path.samefile` when both exist (hard
    links, symbolic links, ``./x`` and ``x``), else their resolved absolute paths."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.expanduser().resolve() == b.expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies inside the directory ``folder`` (resolved paths)."""
    try:
        path.expanduser().resolve().relative_to(folder.expanduser().resolve())
    except ValueError:
        return False
    return True


def check_outputs(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None], *,
                  force: bool, stores: Mapping[str, Sequence[Path]] | None = None) -> None:
    """Refuse outputs that would destroy an input, each other, or an existing file.

    Args:
        outputs: option name (``-o/--out``, ``--save-test``) -> the file it writes (None:
            not written).
        inputs: what the command reads, by its name on the command line (``DATA``,
            ``--x2``, ``MODEL``, ``--arch``) -> path (None, or a spec string that is no
            file, is skipped).
        force: ``--force``: an existing output file that is no input may be replaced.
        stores: option name -> the directories it writes arrays into (``--store DIR``:
            ``DIR/ntk``, ``DIR/nngp``): none may be, or hold, an input or output file.

    Raises:
        CommandError: the first conflict, naming both paths and what to do.
    """
    inputs = {name: p for name, p in inputs.items() if p is not None}
    outputs = {name: p for name, p in outputs.items() if p is not None}
    for out_name, out in outputs.items():
        for in_name, src in inputs.items():
            if same_path(out, src):
                raise CommandError(f"{out_name} {out} is the input {in_name} ({src}); writing "
                                   f"it would destroy the input. Give another output file.")
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if same_path(outputs[a], outputs[b]):
                raise CommandError(f"{a} and {b} are the same file ({outputs[a]}); give "
                                   f"each its own file.")
    for store_name, folders in (stores or {}).items():
        for folder in folders:
            for what, path in [*inputs.items(), *outputs.items()]:
                if same_path(folder, path) or _inside(path, folder):
                    raise CommandError(f"{store_name} would write its arrays into {folder}, "
                                       f"which holds {what} ({path}). Give a store directory "
                                       f"of its own.")
    for out_name, out in outputs.items():
        if out.is_dir():
            raise CommandError(f"{out_name} {out} is a directory; give a file name.")
        if out.exists() and not force:
            raise CommandError(f"{out_name} {out} already exists; pass --force to replace "
                               f"it, or give another file.")


def check_finite(arrays: Mapping[str, np.ndarray], what: str, fix: str) -> None:
    """Refuse to write ``arrays`` (name -> array) when one holds NaN or infinity.

    Args:
        arrays: what would be written, by name (``ntk``, ``predictions``).
        what: what computed them, for the message (``the kernel of x.npy``).
        fix: what to do, in the command line's terms.

    Raises:
        CommandError: naming the array, how many entries are not finite, and ``fix``.
    """
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "fc":
            continue
        bad = ~np.isfinite(a)
        if bad.any():
            kinds = " and ".join(k for k, m in (("NaN", np.isnan(a)), ("infinite",
                                                                       np.isinf(a))) if m.any())
            raise CommandError(f"{what}: {name} has {int(bad.sum())} {kinds} entries of "
                               f"{a.size}; nothing was written. {fix}")


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Write ``out`` through ``write(tmp)`` into a temporary file beside it (same folder,
    same suffix, so NumPy adds none), then `os.replace` it into place.

    On any failure the temporary file is removed and ``out`` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def file_or_none(value: str | Path | None) -> Path | None:
    """``value`` as a `Path` when it names an existing file (an ``--arch`` spec string
    names none), else None."""
    if value is None:
        return None
    p = Path(value)
    try:
        return p if p.is_file() else None
    except (OSError, ValueError):       # a spec string too long for a path, a NUL byte
        return None
