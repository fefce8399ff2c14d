"""The compact grammar (see `ntkit.spec`): a recursive descent parser whose depth,
repeat counts and expanded layer count are bounded by `SpecLimits`, and the same
for layer lists loaded from JSON/YAML or given as Python lists."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from .. import layers as L
from ..errors import SpecError
from ..layers.base import Layer
from ..layers.registry import normal_name, spec_constructors
from ._limits import EXPANDED, SpecLimits, beyond, over, short

__all__ = ["CONSTANTS", "LAYERS", "NAME", "LayerList", "known", "parse_string"]




class _Layers(Mapping):
    """Compact-spec name -> constructor, read from the layer registry at each use, so
    that a layer class defined later (with ``spec_names``) is known at once. Keys are
    lowercase without underscores."""

    def _table(self) -> dict[str, Callable[..., Layer]]:
        return {normal_name(name): ctor for name, ctor in spec_constructors().items()}

    def snapshot(self) -> dict[str, Callable[..., Layer]]:
        """The table now, read once for a whole parse (a lookup in the live view reads
        the registry each time)."""
        return self._table()

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
LAYERS: _Layers = _Layers()
CONSTANTS = {"true": True, "false": False, "none": None, "null": None}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)(?![\w])",
                     re.IGNORECASE)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def known() -> str:
    return ", ".join(sorted(LAYERS))


def _normal(name: str) -> str:
    return normal_name(name)



class _Parser:
    """Recursive descent over one compact spec string, tracking positions, group depth
    (bounded by ``limits.max_depth``, so recursion is too) and the expanded layer count.
    The spec rules return ``(layer, number of layers after expansion)``."""

    def __init__(self, text: str, where: str, limits: SpecLimits,
                 ctors: dict[str, Callable[..., Layer]] | None = None) -> None:
        self.text, self.pos, self.where, self.limits, self.depth = text, 0, where, limits, 0
        self.ctors = LAYERS.snapshot() if ctors is None else ctors

    def error(self, message: str, start: int | None = None, end: int | None = None,
              *, list_layers: bool = False) -> SpecError:
        start = self.pos if start is None else start
        end = max(start + 1, end if end is not None else start + 1)
        end = min(end, max(len(self.text), start + 1))
        # Position in characters from 1, and (a window of) the text with a caret line under
        # it; line breaks and tabs shown as spaces so that the caret stays aligned.
        lo = max(0, start - 60)
        hi = min(len(self.text), max(end, start + 1) + 60)
        shown = self.text[lo:hi].translate({ord(c): " " for c in "\n\r\t\v\f"})
        head, tail = ("..." if lo else ""), ("..." if hi < len(self.text) else "")
        caret = " " * (len(head) + start - lo) + "^" * min(end - start, hi - start + 1)
        lines = [f"cannot parse architecture{self.where} at character {start + 1}: {message}",
                 f"  {head}{shown}{tail}", "  " + caret]
        if list_layers:
            lines.append(f"known layers: {known()}")
        return SpecError("\n".join(lines))

    def enter(self, start: int) -> None:
        """One group deeper, refused beyond ``limits.max_depth``."""
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise self.error(over("the nesting depth", self.depth, "max_depth", self.limits),
                             start)

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def found(self) -> str:
        c = self.peek()
        return repr(c) if c else "the end of the spec"

    def expect(self, char: str, context: str) -> None:
        if self.peek() != char:
            raise self.error(f"expected {char!r} {context}, found {self.found()}")
        self.pos += 1

    def count(self, n: int, start: int) -> int:
        if n > self.limits.max_layers:
            raise self.error(over(EXPANDED, n,
                                   "max_layers", self.limits), start)
        return n

    # spec := item ("-" item)*
    def spec(self, closing: str = "", opened: int = 0) -> tuple[Layer, int]:
        layers, total = [], 0
        while True:
            start = self.pos
            layer, n = self.item()
            layers.append(layer)
            total = self.count(total + n, start)
            if self.peek() != "-":
                break
            self.pos += 1
        c = self.peek()
        if c != closing:
            if c == "":
                raise self.error(f"expected {closing!r} to close the group opened at "
                                 f"character {opened + 1}, found the end of the spec")
            raise self.error(f"unexpected {c!r}; layers are joined with '-'")
        return (layers[0] if len(layers) == 1 else L.Sequential(*layers)), total

    def item(self) -> tuple[Layer, int]:
        self.skip()
        start = self.pos
        m = re.compile(r"\d+").match(self.text, self.pos)
        if not m:
            return self.layer(start), 1
        self.pos = m.end()
        digits = m.group().lstrip("0") or "0"
        if len(digits) > len(str(self.limits.max_repeat)) or int(digits) > self.limits.max_repeat:
            shown = digits if len(digits) <= 20 else f"a {len(digits)}-digit number"
            raise self.error(over("the repeat count", shown, "max_repeat", self.limits),
                             start, m.end())
        n = int(digits)
        self.expect("*", "after a repeat count (write N*(layers) or N*layer)")
        if self.peek() == "(":
            opened = self.pos
            self.enter(opened)
            self.pos += 1
            inner, count = self.spec(closing=")", opened=opened)
            self.pos += 1
            self.depth -= 1
        else:
            self.skip()
            inner, count = self.layer(self.pos), 1
        # counted before Repeat is built: 1000*(1000*(...)) stops here, never expanded
        return L.Repeat(inner, n), self.count(n * count, start)

    def layer(self, start: int) -> Layer:
        m = NAME.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected a layer name, found {self.found()}", list_layers=True)
        name, self.pos = m.group(), m.end()
        key = _normal(name)
        if key not in self.ctors:
            raise self.error(f"unknown layer {name!r}", start, m.end(), list_layers=True)
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        accepted = _parameters(self.ctors[key])
        if self.peek() == "(":
            opened = self.pos
            self.pos += 1
            if self.peek() != ")":
                while True:
                    self.arg(args, kwargs, key, accepted)
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
            self.expect(")", f"to close the arguments of {name!r} opened at character "
                             f"{opened + 1}")
        return _construct(key, self.ctors[key], args, kwargs,
                          lambda msg: self.error(msg, start, self.pos))

    def arg(self, args: list, kwargs: dict, layer: str, accepted: list[str]) -> None:
        self.skip()
        start = self.pos
        m = NAME.match(self.text, self.pos)
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
        if c and c in "([":
            close = ")" if c == "(" else "]"
            self.enter(start)
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
            self.expect(close, f"to close the tuple opened at character {start + 1}")
            self.depth -= 1
            return tuple(items)
        if c and c in "'\"":
            end = self.text.find(c, self.pos + 1)
            if end < 0:
                raise self.error("unterminated string", start)
            self.pos = end + 1
            return self.text[start + 1:end]
        m = _NUMBER.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            token = m.group()
            try:
                return int(token) if re.fullmatch(r"[+-]?\d+", token) else float(token)
            except ValueError:  # an int of more digits than Python converts
                raise self.error(f"a number of {len(token)} digits is too long; write "
                                 f"large values in exponent form (e.g. 1e300)", start,
                                 start + 1) from None
        m = NAME.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            word = m.group()
            return CONSTANTS.get(word.lower(), word)
        raise self.error(f"expected a value (number, name, string or tuple), found "
                         f"{self.found()}")


def _parameters(ctor: Callable) -> list[str]:
    """The names of a constructor's arguments."""
    return [p.name for p in inspect.signature(ctor).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _construct(key: str, ctor: Callable[..., Layer], args: list, kwargs: dict,
               error: Callable[[str], SpecError]) -> Layer:
    """``ctor(*args, **kwargs)`` (the layer ``key``), with a parse error naming the
    accepted arguments; NaN arguments are refused (no layer can use one)."""
    named = [*(f"argument {i + 1}" for i in range(len(args))), *kwargs]
    for name, value in zip(named, [*args, *kwargs.values()]):
        if _has_nan(value):
            raise error(f"{key}: {name} is NaN, which no layer can use; give a number")
    try:
        sig = inspect.signature(ctor)
        sig.bind(*args, **kwargs)
    except TypeError as e:
        accepted = ", ".join(_parameters(ctor)) or "no arguments"
        raise error(f"{key}: {e}; {key} takes: {accepted}") from None
    try:
        return ctor(*args, **kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        raise error(f"{key}: {e}") from None


def _has_nan(value: Any) -> bool:
    """Whether a parsed value is NaN or a tuple holding one (no hyperparameter is)."""
    if isinstance(value, tuple):
        return any(_has_nan(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


def parse_string(text: str, where: str, limits: SpecLimits,
                 ctors: dict[str, Callable[..., Layer]] | None = None) -> tuple[Layer, int]:
    """A compact spec string to ``(network, number of layers after expansion)``."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"the architecture spec{where} is empty; write layers joined by '-', "
                        f"e.g. 'linear(512)-relu-linear(10)'. Known layers: {known()}")
    if len(text) > limits.max_chars:
        raise beyond(f"the architecture spec{where}", "its length", len(text), "max_chars",
                     limits)
    return _Parser(text, where, limits, ctors).spec()


class LayerList:
    """A loaded layer list (JSON/YAML or Python lists and dicts) to a network, within
    ``limits``: its depth bounds the recursion, repeats and layers are counted first."""

    def __init__(self, limits: SpecLimits) -> None:
        self.limits, self.ctors = limits, LAYERS.snapshot()

    def check_depth(self, depth: int, where: str) -> None:
        if depth > self.limits.max_depth:
            raise beyond(where, "the nesting depth", depth, "max_depth", self.limits)

    def items(self, items: Any, where: str, depth: int) -> tuple[Layer, int]:
        self.check_depth(depth, where)
        if not isinstance(items, list) or not items:
            raise SpecError(f"{where}: expected a non-empty list of layers, got "
                            f"{short(items)}.")
        built, total = [], 0
        for i, item in enumerate(items):
            layer, n = self.item(item, f"{where}[{i}]", depth)
            built.append(layer)
            total += n
            if total > self.limits.max_layers:
                raise beyond(where, EXPANDED, total, "max_layers", self.limits)
        return (built[0] if len(built) == 1 else L.Sequential(*built)), total

    def item(self, item: Any, where: str, depth: int) -> tuple[Layer, int]:
        if isinstance(item, str):
            return parse_string(item, f" ({where})", self.limits, self.ctors)
        if not isinstance(item, dict):  # a malformed spec file is a ValueError, as a bad string
            raise SpecError(
                f"{where}: a layer is a string such as 'relu', a mapping "
                f"{{'layer': NAME, 'args': [...], 'kwargs': {{...}}}} or "
                f"{{'repeat': N, 'layers': [...]}}; got {short(item)}.")
        if "repeat" in item:
            extra = set(item) - {"repeat", "layers"}
            n = item["repeat"]
            if extra or not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise SpecError(f"{where}: a repeat is {{'repeat': N, 'layers': [...]}} with an "
                                f"int N >= 0; got {short(item)}.")
            if n > self.limits.max_repeat:
                raise beyond(where, "the repeat count", n, "max_repeat", self.limits)
            inner, count = self.items(item.get("layers"), f"{where}.layers", depth + 1)
            if n * count > self.limits.max_layers:
                raise beyond(where, EXPANDED, n * count, "max_layers", self.limits)
            return L.Repeat(inner, n), n * count
        extra = set(item) - {"layer", "args", "kwargs"}
        if "layer" not in item or extra:
            raise SpecError(f"{where}: expected the keys 'layer' (and optionally 'args', "
                            f"'kwargs'), got {short(sorted(map(str, item)))}.")
        name = item["layer"]
        key = _normal(name) if isinstance(name, str) else None
        if key not in self.ctors:
            raise SpecError(f"{where}: unknown layer {short(name)}; known layers: {known()}")
        args, kwargs = item.get("args", []), item.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise SpecError(f"{where}: 'args' must be a list and 'kwargs' a mapping, got "
                            f"{short(args)} and {short(kwargs)}.")
        if not all(isinstance(k, str) for k in kwargs):
            raise SpecError(f"{where}: 'kwargs' keys must be argument names, got "
                            f"{short(list(kwargs))}.")

        def tuples(v, d):  # JSON has no tuples: lists are kernel sizes, strides, paddings
            if isinstance(v, list):
                self.check_depth(d, where)
                return tuple(tuples(u, d + 1) for u in v)
            return v

        return _construct(key, self.ctors[key], [tuples(a, depth + 2) for a in args],
                          {k: tuples(v, depth + 2) for k, v in kwargs.items()},
                          lambda msg: SpecError(f"{where}: {msg}")), 1
