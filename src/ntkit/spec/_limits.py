"""The bounds a spec is read within (`SpecLimits`), and JSON/YAML loading that keeps to
them without recursion: bracket depth counted before `json.loads`, YAML events read
before the document is built (anchors and aliases refused)."""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import SpecError

__all__ = ["EXPANDED", "SpecLimits", "as_limits", "beyond", "json_depth", "load_file", "load_json",
           "over", "short"]


@dataclass(frozen=True)
class SpecLimits:
    """Bounds on what `parse_architecture` accepts, checked before any layer is built.

    A spec is data a user may not have written (a file, a saved model), so it is
    read within bounds: nothing it says can recurse without limit, build millions of
    layers, or take more than a moment. Raise a bound by passing your own, e.g.
    ``parse_architecture(spec, limits=SpecLimits(max_repeat=5000))``.

    Attributes:
        max_depth: nested groups: ``N*( ... )`` repeats, tuples in arguments, and
            lists/mappings in a JSON/YAML file (its brackets counted before it is loaded).
        max_repeat: the largest repeat count ``N`` in ``N*(...)`` or ``{"repeat": N}``.
        max_layers: layers after expanding every repeat (``3*(linear-relu)`` is 6),
            counted from the text, without expanding it.
        max_chars: the length of a spec string, or the size in bytes of a spec file.
    """

    max_depth: int = 32
    max_repeat: int = 1000
    max_layers: int = 10_000
    max_chars: int = 1_000_000

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SpecLimits.{f.name} must be a positive int, got {v!r}.")


#: what `max_layers` counts, in messages
EXPANDED = "the number of layers after expanding repeats"
_FIX = "if the spec is meant to be this large, pass limits=SpecLimits({field}=...)"


def over(what: str, value: int, field: str, limits: SpecLimits) -> str:
    """The message for a spec beyond one of its limits."""
    return (f"{what} is {value}, above the limit {field}={getattr(limits, field)} (a guard "
            f"against specs that would never finish); {_FIX.format(field=field)} to "
            f"parse_architecture")


def beyond(where: str, what: str, value: Any, field: str, limits: SpecLimits) -> SpecError:
    """The `SpecError` for ``where`` beyond one of its limits (`over`'s message)."""
    return SpecError(f"{where}: {over(what, value, field, limits)}.")



def short(value: Any, n: int = 200) -> str:
    """``repr(value)``, cut to ``n`` characters (a hostile file can be large)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, n, n
    text = r.repr(value)
    return text if len(text) <= n else text[:n] + "..."


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text (brackets inside strings
    ignored), found without recursion, so that deep text is refused before
    `json.loads` (which recurses) reads it."""
    depth = deepest = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def load_json(text: str, where: str, limits: SpecLimits | None = None) -> Any:
    """``json.loads(text)`` within ``limits`` (length and bracket depth checked first), or
    a `SpecError` that says where and what is wrong, never a RecursionError."""
    limits = as_limits(limits)
    if len(text) > limits.max_chars:
        raise beyond(where, "the length of the JSON text", len(text), "max_chars", limits)
    depth = json_depth(text)
    if depth > limits.max_depth + 3:  # a mapping, its list, a layer's args
        raise beyond(where, "the bracket depth", depth, "max_depth", limits)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise SpecError(f"{where}: not valid JSON ({str(e)[:200]}).") from None


def load_yaml(text: str, where: str, limits: SpecLimits) -> Any:
    """A YAML document, safely: its events are read first (no recursion), refusing
    anchors and aliases (an alias bomb expands exponentially) and deep nesting."""
    import yaml

    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise SpecError(f"{where}: YAML anchors and aliases (&name, *name) are not "
                                f"accepted in an architecture file; write each layer out, or "
                                f"use a repeat ({{repeat: N, layers: [...]}}).")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > limits.max_depth + 3:
                    raise beyond(where, "the nesting depth", depth, "max_depth", limits)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise SpecError(f"{where}: not valid YAML ({str(e)[:300]}).") from None


def load_file(path: Path, limits: SpecLimits) -> Any:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"architecture file {str(path)!r} does not exist.")
    if suffix not in (".json", ".yaml", ".yml"):
        raise SpecError(f"architecture file {str(path)!r} must end in .json, .yaml or .yml, "
                        f"got {suffix or 'no suffix'!r}.")
    size = path.stat().st_size
    if size > limits.max_chars:
        raise beyond(str(path), "the file size in bytes", size, "max_chars", limits)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e}); an architecture file is JSON or "
                        f"YAML text.") from None
    if suffix == ".json":
        return load_json(text, str(path), limits)
    try:
        import yaml  # noqa: F401
    except ImportError as e:
        raise ImportError(f"reading the YAML architecture {path} needs PyYAML: "
                          f"pip install pyyaml (or write it as JSON).") from e
    return load_yaml(text, str(path), limits)


def as_limits(limits: Any) -> SpecLimits:
    if limits is None:
        return SpecLimits()
    if not isinstance(limits, SpecLimits):
        raise TypeError(f"limits must be an ntkit.spec.SpecLimits, got "
                        f"{type(limits).__name__}.")
    return limits
