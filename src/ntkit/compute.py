"""Deprecated: ``ntkit.compute`` was split into `ntkit._budget` (memory budgets,
tile sides, progress bars) and `ntkit.tiling` (tiled kernel computation).

Its names still resolve here, with a DeprecationWarning, for one release;
``nk.parse_memory`` is the public home of `parse_memory`.
"""

from __future__ import annotations

import importlib
import warnings

#: Where each name of the old module lives now.
_MOVED = {
    "parse_memory": "ntkit._budget",
    "progress_bar": "ntkit._budget",
    "tile_sides": "ntkit._budget",
    "DEFAULT_MEMORY_BUDGET": "ntkit._budget",
    "tiled_kernel": "ntkit.tiling",
    "peak_positions": "ntkit.tiling",
}


def __getattr__(name: str):
    home = _MOVED.get(name, "ntkit.tiling")  # private names (_tile, ...) went to tiling
    module = importlib.import_module(home)
    if not hasattr(module, name):
        raise AttributeError(f"module 'ntkit.compute' has no attribute {name!r}")
    warnings.warn(
        f"ntkit.compute is deprecated and will be removed in the next release; import "
        f"{name} from {home} instead.", DeprecationWarning, stacklevel=2)
    return getattr(module, name)
