"""Architectures as text: a compact spec string, or a JSON/YAML layer list.

The compact form chains layers with ``-``::

    linear(512, w_std=1.5, b_std=0.1)-relu-linear(512, w_std=1.5, b_std=0.1)-relu-linear(10)
    conv2d(64, 3, padding=same)-relu-avgpool2d(2)-flatten-linear(10)
    3*(linear(512, w_std=1.5)-relu)-linear(10)         # Repeat(Sequential(...), 3)

Grammar (whitespace is allowed between tokens)::

    spec     := item ("-" item)*
    item     := INT "*" "(" spec ")"  |  layer
    layer    := NAME ["(" [arg ("," arg)*] ")"]
    arg      := [NAME "="] value
    value    := number | NAME | 'quoted' | "quoted" | "(" values ")" | "[" values "]"

Layer names are case-insensitive and ignore underscores (``LayerNorm``,
``layer_norm`` and ``layernorm`` are one layer); arguments are those of the
ntkit constructor of the same name, positional or by keyword. The names are
those the layer classes declare (``spec_names``, `ntkit.layers.registry`), so
a layer class defined anywhere joins the grammar; `to_spec` writes what each
layer's ``spec_call`` gives. Bare names as
values are strings (``padding=same``), except ``true``/``false`` and
``none``/``null``. Numbers with a dot or an exponent are floats, others ints.

The file form (``.json``, ``.yaml``/``.yml``; YAML needs PyYAML) holds a
list of layers, or ``{"layers": [...]}``. A layer is a compact string
(``"linear(512, w_std=1.5)"``), ``{"layer": NAME, "args": [...], "kwargs":
{...}}`` (both optional), or ``{"repeat": N, "layers": [...]}``::

    {"layers": [
        {"repeat": 2, "layers": [{"layer": "linear", "args": [512],
                                   "kwargs": {"w_std": 1.5, "b_std": 0.1}}, "relu"]},
        {"layer": "linear", "args": [10]}
    ]}

`to_spec` writes the compact form back; ``parse_architecture(to_spec(net))``
has the same kernel as ``net``.

Limits. A spec may come from someone else (a file, a saved model), so it is read
within `SpecLimits`, checked before any repeat is expanded: at most 32 nested
groups (``N*(...)``, tuples, JSON/YAML lists), repeat counts up to 1000, 10,000
layers after expansion, and 1,000,000 characters (or bytes of a file). JSON
nesting is counted before `json.loads` reads it; YAML anchors and aliases are
refused. Anything beyond, and any text that does not parse (``"linear("``), is
an `ntkit.errors.SpecError` (a ValueError) that says where and what to do;
never a RecursionError or a hang. Raise a bound with
``parse_architecture(spec, limits=SpecLimits(max_layers=50_000))``.

The package: ``_grammar`` (the parser, for strings and layer lists), ``_limits``
(`SpecLimits`, bounded JSON/YAML loading), ``_write`` (`to_spec`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SpecError
from ..layers.base import Layer
from ._grammar import LAYERS, LayerList, parse_string
from ._limits import SpecLimits, as_limits, load_file, load_json, short
from ._write import to_spec

__all__ = ["LAYERS", "SpecError", "SpecLimits", "load_json", "parse_architecture", "to_spec"]


def parse_architecture(spec: str | dict | list | os.PathLike, *,
                       limits: SpecLimits | None = None) -> Layer:
    """An ntkit network from a compact spec string, a layer list, or a JSON/YAML file.

    Args:
        spec: a compact string such as ``"linear(512)-relu-linear(10)"`` (grammar in
            this module's docstring); a path (`os.PathLike`, or a string ending in
            ``.json``/``.yaml``/``.yml``) of a file holding a layer list; or the
            loaded layer list itself (a list, or a dict with key ``"layers"``).
        limits: the bounds on nesting depth, repeat counts, layers after expansion
            and length (`SpecLimits`; its defaults when None). They are checked
            before any repeat is expanded, so a hostile spec is refused at once.

    Returns:
        The network: one `Layer`, or a `Sequential` of several.

    Raises:
        ntkit.errors.SpecError: (a ValueError) the spec does not parse, or exceeds
            ``limits``. For strings the message gives the character position, the
            spec with a caret under the offending token, and the known layer
            names; for lists, the path of the bad entry (e.g. ``layers[2]``).
            Constructor errors (a negative width, an unknown keyword) are
            reported the same way. YAML anchors and aliases are refused.
        FileNotFoundError: a file path that does not exist.
        ImportError: a YAML file without PyYAML installed.
    """
    limits = as_limits(limits)
    if isinstance(spec, os.PathLike) or (
            isinstance(spec, str) and spec.strip().lower().endswith((".json", ".yaml", ".yml"))):
        path = Path(spec).expanduser()
        spec = load_file(path, limits)
        where = f"{path.name}: layers"
    else:
        where = "layers"
    if isinstance(spec, str):
        return parse_string(spec, "", limits)[0]
    if isinstance(spec, dict):
        if set(spec) != {"layers"}:
            raise SpecError(f"an architecture mapping has one key, 'layers' (a list of "
                            f"layers); got the keys {short(sorted(map(str, spec)))}.")
        spec = spec["layers"]
    if isinstance(spec, list):
        return LayerList(limits).items(spec, where, 1)[0]
    raise TypeError(f"spec must be a string, a path, a list of layers or "
                    f"{{'layers': [...]}}, got {type(spec).__name__}.")
