"""Memory budgets, tile sizes and progress bars: the leaf of ntkit's import graph.

Everything that allocates O(N^2) or more takes a ``memory_budget``; this module
turns one into bytes (`parse_memory`), bytes into tile sides (`tile_sides`), and
draws the progress bars of long loops (`progress_bar`). It imports nothing of
ntkit, so that every other module may import it.
"""

from __future__ import annotations

import math
import numbers
import re

import torch
from tqdm.auto import tqdm

__all__ = ["DEFAULT_MEMORY_BUDGET", "parse_memory", "progress_bar", "tile_sides"]

#: Working memory for kernel tiles when none is given: 1 GiB.
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Temporaries a layer rule keeps alive per kernel entry (a generous bound).
TEMPORARIES_PER_ENTRY = 24
#: On CPU, tiles of this many entries keep the elementwise passes in cache.
_CPU_TILE_ENTRIES = 384 * 384
#: The same for kernels with spatial positions (measured on the `cnn` and `myrtle`
#: workloads: flat between 2^19 and 2^22, slower above).
_CPU_PAIR_TILE_ENTRIES = 1 << 20

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_memory(budget: float | str | None) -> int:
    """Bytes from a number or a string such as ``"512MB"`` or ``"2GiB"``.

    Args:
        budget: bytes as an int or float (NumPy scalars too, e.g. ``np.int64``
            from a parameter grid), a string with a unit (``b``, ``kb``/``k``,
            ``mb``/``m``, ``gb``/``g``, ``tb``/``t`` in powers of 1000;
            ``kib``, ``mib``, ``gib``, ``tib`` in powers of 1024; any case), or
            None for `DEFAULT_MEMORY_BUDGET` (1 GiB).

    Returns:
        The budget in whole bytes, at least 1.

    Raises:
        TypeError: ``budget`` is not a number, a string or None (a bool is refused).
        ValueError: a string that is not a number with a known unit, or a
            budget that is not positive and finite.
    """
    if budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"memory_budget={budget!r} is not understood; give bytes as an int or a string "
                f"such as '512MB' or '2GiB'."
            )
        budget = float(m.group(1)) * _UNITS[m.group(2).lower()]
    # numbers.Integral / numbers.Real include NumPy's integer and float scalars; bool (an
    # Integral) is refused, and NumPy's bool_ is not a number at all.
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"memory_budget must be a number of bytes or a string such as '2GiB', got "
            f"{type(budget).__name__}."
        )
    value = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(
            f"memory_budget must be positive and finite (bytes), got {budget!r}; "
            f"e.g. memory_budget='2GiB'."
        )
    return int(value)


def progress_bar(items, *, desc: str, unit: str, progress: bool | None,
                 min_items: int = 1, initial: int = 0) -> tqdm:
    """A tqdm bar over ``items``.

    Args:
        items: a sized iterable.
        desc: the bar's label.
        unit: what one item is called.
        progress: True always draws the bar, False never; None draws it only
            for at least ``min_items`` items that take more than 2 s on a terminal.
        min_items: see ``progress``.
        initial: items counted as done before ``items`` (a resumed run).
    """
    counts = {"initial": initial, "total": len(items) + initial} if initial else {}
    if progress is None:
        return tqdm(items, desc=desc, unit=unit, delay=2.0,
                    disable=True if len(items) < min_items else None, **counts)
    return tqdm(items, desc=desc, unit=unit, disable=not progress, **counts)


def tile_sides(n1: int, n2: int, entry_bytes: int, budget: int, device: torch.device,
               positions: int = 1) -> tuple[int, int]:
    """Rows and columns per tile: within budget, square when possible.

    Args:
        n1: rows of the whole matrix.
        n2: columns of the whole matrix.
        entry_bytes: the size of one input pair's kernel.
        budget: bytes of working memory (see `parse_memory`).
        device: where the tiles are computed; on CPU tiles are also capped so
            that they stay in cache.
        positions: how many numbers one input pair's kernel is (1 for dense
            features).

    Returns:
        ``(rows, cols)``, each at least 1 and at most ``n1`` and ``n2``.
    """
    entries = max(1, budget // (entry_bytes * TEMPORARIES_PER_ENTRY))
    if device.type == "cpu":
        cap = _CPU_TILE_ENTRIES if positions == 1 else _CPU_PAIR_TILE_ENTRIES // positions
        entries = min(entries, max(1, cap))
    side = max(1, math.isqrt(entries))
    rows = min(n1, side)
    cols = min(n2, max(1, entries // rows))
    return rows, cols
