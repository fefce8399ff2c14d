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
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from . import layers as L
from .layers.base import Layer
from .layers.registry import normal_name, spec_constructors

__all__ = ["LAYERS", "parse_architecture", "to_spec"]


class _Layers(Mapping):
    """Compact-spec name -> constructor, read from the layer registry at each use, so
    that a layer class defined later (with ``spec_names``) is known at once. Keys are
    lowercase without underscores."""

    def _table(self) -> dict[str, Callable[..., Layer]]:
        return {normal_name(name): ctor for name, ctor in spec_constructors().items()}

    def __getitem__(self, key: str) -> Callable[..., Layer]:
        return self._table()[key]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"LAYERS({sorted(self)})"


#: Compact-spec name -> constructor: every layer class that declares ``spec_names``
#: (`ntkit.layers.registry`), a live view.
LAYERS: Mapping[str, Callable[..., Layer]] = _Layers()
_CONSTANTS = {"true": True, "false": False, "none": None, "null": None}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)(?![\w])",
                     re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _known() -> str:
    return ", ".join(sorted(LAYERS))


def _normal(name: str) -> str:
    return normal_name(name)


# ------------------------------------------------------------------ parsing
class _Parser:
    """Recursive descent over one compact spec string, tracking positions."""

    def __init__(self, text: str, where: str = "") -> None:
        self.text, self.pos, self.where = text, 0, where

    def error(self, message: str, start: int | None = None, end: int | None = None,
              *, list_layers: bool = False) -> ValueError:
        start = self.pos if start is None else start
        end = max(start + 1, end if end is not None else start + 1)
        end = min(end, max(len(self.text), start + 1))
        # Position in characters from 1, and the text with a caret line under it.
        lines = [f"cannot parse architecture{self.where} at character {start + 1}: {message}",
                 f"  {self.text}", "  " + " " * start + "^" * (end - start)]
        if list_layers:
            lines.append(f"known layers: {_known()}")
        return ValueError("\n".join(lines))

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str, context: str) -> None:
        if self.peek() != char:
            got = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
            raise self.error(f"expected {char!r} {context}, found {got}")
        self.pos += 1

    # spec := item ("-" item)*
    def spec(self, closing: str = "") -> Layer:
        items = [self.item()]
        while self.peek() == "-":
            self.pos += 1
            items.append(self.item())
        c = self.peek()
        if c != closing:
            if c == "":
                raise self.error(f"expected {closing!r} to close the group")
            raise self.error(f"unexpected {c!r}; layers are joined with '-'",
                             list_layers=False)
        return items[0] if len(items) == 1 else L.Sequential(*items)

    def item(self) -> Layer:
        self.skip()
        start = self.pos
        m = re.compile(r"\d+").match(self.text, self.pos)
        if m:
            self.pos = m.end()
            self.expect("*", "after a repeat count (write N*(layers) or N*layer)")
            if self.peek() == "(":
                self.pos += 1
                inner = self.spec(closing=")")
                self.pos += 1
            else:
                self.skip()
                inner = self.layer(self.pos)
            return L.Repeat(inner, int(m.group()))
        return self.layer(start)

    def layer(self, start: int) -> Layer:
        m = _NAME.match(self.text, self.pos)
        if not m:
            got = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
            raise self.error(f"expected a layer name, found {got}", list_layers=True)
        name, self.pos = m.group(), m.end()
        key = _normal(name)
        if key not in LAYERS:
            raise self.error(f"unknown layer {name!r}", start, m.end(), list_layers=True)
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        accepted = _parameters(LAYERS[key])
        if self.peek() == "(":
            self.pos += 1
            if self.peek() != ")":
                while True:
                    self.arg(args, kwargs, key, accepted)
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
            self.expect(")", f"to close the arguments of {name!r}")
        return _construct(key, args, kwargs, lambda msg: self.error(msg, start, self.pos))

    def arg(self, args: list, kwargs: dict, layer: str, accepted: list[str]) -> None:
        self.skip()
        start = self.pos
        m = _NAME.match(self.text, self.pos)
        if m:
            after = m.end()
            while after < len(self.text) and self.text[after].isspace():
                after += 1
            if after < len(self.text) and self.text[after] == "=":
                key = m.group()
                if key not in accepted:
                    raise self.error(f"{layer} has no argument {key!r}; it takes: "
                                     f"{', '.join(accepted) or 'no arguments'}", start, m.end())
                if key in kwargs:
                    raise self.error(f"keyword {key!r} given twice", start, m.end())
                self.pos = after + 1
                kwargs[key] = self.value()
                return
        if kwargs:
            raise self.error("positional argument after a keyword argument", start)
        args.append(self.value())

    def value(self) -> Any:
        self.skip()
        start = self.pos
        c = self.peek()
        if c in "([":
            close = ")" if c == "(" else "]"
            self.pos += 1
            items = []
            if self.peek() != close:
                while True:
                    items.append(self.value())
                    if self.peek() == ",":
                        self.pos += 1
                        if self.peek() == close:
                            break
                        continue
                    break
            self.expect(close, "to close the tuple")
            return tuple(items)
        if c in "'\"":
            end = self.text.find(c, self.pos + 1)
            if end < 0:
                raise self.error("unterminated string", start)
            self.pos = end + 1
            return self.text[start + 1:end]
        m = _NUMBER.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            token = m.group()
            if re.fullmatch(r"[+-]?\d+", token):
                return int(token)
            return float(token)
        m = _NAME.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            word = m.group()
            return _CONSTANTS.get(word.lower(), word)
        got = repr(c) if c else "the end"
        raise self.error(f"expected a value (number, name, string or tuple), found {got}")


def _parameters(ctor: Callable) -> list[str]:
    """The names of a constructor's arguments."""
    return [p.name for p in inspect.signature(ctor).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _construct(key: str, args: list, kwargs: dict, error: Callable[[str], ValueError]
               ) -> Layer:
    """``LAYERS[key](*args, **kwargs)``, with a parse error naming the accepted arguments."""
    ctor = LAYERS[key]
    try:
        sig = inspect.signature(ctor)
        sig.bind(*args, **kwargs)
    except TypeError as e:
        accepted = ", ".join(_parameters(ctor)) or "no arguments"
        raise error(f"{key}: {e}; {key} takes: {accepted}") from None
    try:
        return ctor(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise error(f"{key}: {e}") from None


def _parse_string(text: str, where: str = "") -> Layer:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the architecture spec{where} is empty; write layers joined by '-', "
                         f"e.g. 'linear(512)-relu-linear(10)'. Known layers: {_known()}")
    p = _Parser(text, where)
    return p.spec()


def _from_items(items: Any, where: str) -> Layer:
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: expected a non-empty list of layers, got {items!r}.")
    layers = [_from_item(item, f"{where}[{i}]") for i, item in enumerate(items)]
    return layers[0] if len(layers) == 1 else L.Sequential(*layers)


def _from_item(item: Any, where: str) -> Layer:
    if isinstance(item, str):
        return _parse_string(item, f" ({where})")
    if not isinstance(item, dict):  # a malformed spec file is a ValueError, as a bad string
        raise ValueError(
            f"{where}: a layer is a string such as 'relu', a mapping "
            f"{{'layer': NAME, 'args': [...], 'kwargs': {{...}}}} or "
            f"{{'repeat': N, 'layers': [...]}}; got {item!r}.")
    if "repeat" in item:
        extra = set(item) - {"repeat", "layers"}
        n = item["repeat"]
        if extra or not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{where}: a repeat is {{'repeat': N, 'layers': [...]}} with an "
                             f"int N >= 0; got {item!r}.")
        return L.Repeat(_from_items(item.get("layers"), f"{where}.layers"), n)
    extra = set(item) - {"layer", "args", "kwargs"}
    if "layer" not in item or extra:
        raise ValueError(f"{where}: expected the keys 'layer' (and optionally 'args', "
                         f"'kwargs'), got {sorted(item)}.")
    name = item["layer"]
    key = _normal(name) if isinstance(name, str) else None
    if key not in LAYERS:
        raise ValueError(f"{where}: unknown layer {name!r}; known layers: {_known()}")
    args, kwargs = item.get("args", []), item.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError(
            f"{where}: 'args' must be a list and 'kwargs' a mapping, got {args!r} and "
            f"{kwargs!r}.")

    def tuples(v):  # JSON has no tuples: lists are kernel sizes, strides, paddings
        return tuple(tuples(u) for u in v) if isinstance(v, list) else v

    return _construct(key, [tuples(a) for a in args], {k: tuples(v) for k, v in kwargs.items()},
                      lambda msg: ValueError(f"{where}: {msg}"))


def _load_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"architecture file {str(path)!r} does not exist.")
    text = path.read_text()
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"reading the YAML architecture {path} needs PyYAML: "
                              f"pip install pyyaml (or write it as JSON).") from e
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e}).") from None
    raise ValueError(f"architecture file {str(path)!r} must end in .json, .yaml or .yml, "
                     f"got {suffix or 'no suffix'!r}.")


def parse_architecture(spec: str | dict | list | os.PathLike) -> Layer:
    """An ntkit network from a compact spec string, a layer list, or a JSON/YAML file.

    Args:
        spec: a compact string such as ``"linear(512)-relu-linear(10)"`` (grammar in
            this module's docstring); a path (`os.PathLike`, or a string ending in
            ``.json``/``.yaml``/``.yml``) of a file holding a layer list; or the
            loaded layer list itself (a list, or a dict with key ``"layers"``).

    Returns:
        The network: one `Layer`, or a `Sequential` of several.

    Raises:
        ValueError: the spec does not parse. For strings the message gives the
            character position, the spec with a caret under the offending token,
            and the known layer names; for lists, the path of the bad entry
            (e.g. ``layers[2]``). Constructor errors (a negative width, an
            unknown keyword) are reported the same way.
        FileNotFoundError: a file path that does not exist.
        ImportError: a YAML file without PyYAML installed.
    """
    if isinstance(spec, os.PathLike) or (
            isinstance(spec, str) and spec.strip().lower().endswith((".json", ".yaml", ".yml"))):
        path = Path(spec).expanduser()
        spec = _load_file(path)
        where = f"{path.name}: layers"
    else:
        where = "layers"
    if isinstance(spec, str):
        return _parse_string(spec)
    if isinstance(spec, dict):
        if set(spec) != {"layers"}:
            raise ValueError(f"an architecture mapping has one key, 'layers' (a list of "
                             f"layers); got the keys {sorted(spec)}.")
        spec = spec["layers"]
    if isinstance(spec, list):
        return _from_items(spec, where)
    raise TypeError(f"spec must be a string, a path, a list of layers or "
                    f"{{'layers': [...]}}, got {type(spec).__name__}.")


# ------------------------------------------------------------------ writing
def _num(v: Any) -> str:
    """A value in compact-spec syntax; floats as their shortest exact repr."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"a hyperparameter tensor of shape {tuple(v.shape)} has no spec "
                             f"form; only scalars do.")
        v = float(v.detach())
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return v if _NAME.fullmatch(v) and v.lower() not in _CONSTANTS else repr(v)
    if isinstance(v, (tuple, list)):
        inner = ",".join(_num(u) for u in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    raise ValueError(f"the value {v!r} has no spec form.")


def _call(name: str, args: list, kwargs: dict) -> str:
    parts = [_num(a) for a in args] + [f"{k}={_num(v)}" for k, v in kwargs.items()]
    return f"{name}({','.join(parts)})" if parts else name


def to_spec(layer: Layer) -> str:
    """The compact spec string of a network, the inverse of `parse_architecture`.

    ``parse_architecture(to_spec(net))`` computes the same kernel as ``net``
    (and builds the same finite network). Nested `Sequential` containers are
    flattened; `Repeat` becomes ``N*(...)``; hyperparameters given as tensors
    are written as their current values.

    Args:
        layer: an ntkit network.

    Returns:
        A string such as ``"linear(512,w_std=1.5)-relu-linear(10)"``.

    Raises:
        ValueError: the network holds a layer the grammar does not cover
            (branching containers such as `FanOut`/`Parallel`/`FanIn*`,
            `Elementwise` with an arbitrary function, attention with a
            ``pos_emb_decay`` function); the
            message names it.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"to_spec takes an ntkit Layer, got {type(layer).__name__}.")
    return _write(layer)


def _write(layer: Layer) -> str:
    if isinstance(layer, L.Repeat) and type(layer) is L.Repeat:
        return f"{layer.n}*({_write(layer.layer)})"
    if type(layer) is L.Sequential:
        if not layer.layers:
            return "identity"
        return "-".join(_write(m) for m in layer.layers)
    # Only a class that declares its own spec names has a spec form: a subclass (such
    # as from_torch's shape-checked layers) may mean more than its parent's name says.
    call = layer.spec_call() if "spec_names" in type(layer).__dict__ else None
    if call is None:
        raise ValueError(
            f"{layer!r} has no compact spec form: the grammar covers sequential networks of "
            f"{', '.join(sorted(LAYERS))} and N*(...) repeats, not branching containers "
            f"(FanOut, Parallel, FanIn*) or custom elementwise functions."
        )
    name, args, kwargs = call
    return _call(name, args, kwargs)
