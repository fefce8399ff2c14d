"""The layer registry: one place that knows every layer's names.

A layer class joins by declaring, as class attributes (see `Layer`):

- ``spec_names``: its names in the compact spec grammar (`ntkit.spec`), the
  first being the one `ntkit.spec.to_spec` writes;
- ``torch_modules``: the `torch.nn` module classes `ntkit.from_torch` converts
  into it (through its ``from_torch_module`` classmethod).

`Layer.__init_subclass__` records the class here when it is defined, so the
spec grammar, `to_spec`, `from_torch` and the estimators' activation names
(`ntkit.sklearn`) are all read from this one table; a new layer is one class
in one file. This module imports nothing of ntkit, so `layers.base` can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TorchContext",
    "layer_classes",
    "module_rule",
    "normal_name",
    "register",
    "spec_constructors",
    "torch_module_classes",
]

#: Declared spec name -> constructor, in registration order.
_NAMES: dict[str, Callable[..., Any]] = {}
#: torch module class -> (layer class, whether subclasses of the module convert too).
_TORCH: dict[type, tuple[type, bool]] = {}
#: Every class that declared a spec name or a torch module, in registration order.
_CLASSES: list[type] = []


def normal_name(name: str) -> str:
    """A spec name as the grammar compares it: lowercase, underscores removed
    (``LayerNorm``, ``layer_norm`` and ``layernorm`` are one name)."""
    return name.lower().replace("_", "")


def register(cls: type) -> type:
    """Records the spec names and torch modules that ``cls`` declares itself.

    Called by `Layer.__init_subclass__`; attributes inherited from a parent
    class are not declared again (a private subclass joins nothing).

    Raises:
        ValueError: a spec name or torch module already taken by another class.
    """
    declared = cls.__dict__
    if "spec_names" not in declared and "torch_modules" not in declared:
        return cls
    for name, ctor in cls.spec_constructors().items():
        key = normal_name(name)
        taken = next((n for n in _NAMES if normal_name(n) == key), None)
        if taken is not None and _owner(_NAMES[taken]) is not cls:
            raise ValueError(f"spec name {name!r} of {cls.__name__} is already taken by "
                             f"{_owner(_NAMES[taken]).__name__}.")
        _NAMES[name] = ctor
    for module in declared.get("torch_modules", ()):
        if module in _TORCH and _TORCH[module][0] is not cls:
            raise ValueError(f"torch module {module.__name__} of {cls.__name__} is already "
                             f"converted by {_TORCH[module][0].__name__}.")
        _TORCH[module] = (cls, bool(getattr(cls, "torch_subclasses", True)))
    if cls not in _CLASSES:
        _CLASSES.append(cls)
    return cls


def _owner(ctor: Callable[..., Any]) -> type:
    return getattr(ctor, "layer_class", ctor)


def _loaded() -> None:
    """Imports every layer module, so that all classes have registered."""
    from .. import layers


def spec_constructors() -> dict[str, Callable[..., Any]]:
    """Every spec name as declared (e.g. ``"leaky_relu"``) -> its constructor."""
    _loaded()
    return dict(_NAMES)


def layer_classes() -> list[type]:
    """Every registered layer class (declaring a spec name or a torch module)."""
    _loaded()
    return list(_CLASSES)


def torch_module_classes() -> frozenset[type]:
    """Every torch module class that some layer class declares in ``torch_modules``."""
    _loaded()
    return frozenset(_TORCH)


def module_rule(module: Any) -> type | None:
    """The layer class that converts ``module`` (an ``nn.Module``), or None.

    The module's own class is looked up first, then its bases, for layers
    that accept subclasses (``torch_subclasses = True``); activations match
    their torch class exactly, since a subclass may change ``forward``.
    """
    _loaded()
    for i, base in enumerate(type(module).__mro__):
        entry = _TORCH.get(base)
        if entry is not None and (i == 0 or entry[1]):
            return entry[0]
    return None


@dataclass(frozen=True)
class TorchContext:
    """What a layer's ``from_torch_module`` needs from the conversion.

    Attributes:
        parameterization: ``"ntk"`` or ``"standard"``, for affine layers.
        w_std: the weight scale for every Linear and Conv, or None for
            PyTorch's default initialisation (``1/sqrt(3)``).
        b_std: the bias standard deviation, or None for PyTorch's default
            (``1/sqrt(3 fan_in)``).
        degree: quadrature nodes per axis for activations without a closed form.
        where: the module and its place in the model, for messages.
        fail: ``fail(why, supported=True)`` -> the error to raise, naming the
            module (``supported`` appends the list of what converts).
    """

    parameterization: str
    w_std: float | None
    b_std: float | None
    degree: int
    where: str
    fail: Callable[..., Exception]

    def weight_std(self) -> float:
        """``w_std``, or PyTorch's default initialisation: uniform on
        ``+-1/sqrt(fan_in)`` has variance ``1 / (3 fan_in)``, so ``1/sqrt(3)``."""
        return self.w_std if self.w_std is not None else 1 / math.sqrt(3)

    def bias_std(self, present: bool, fan_in: int) -> float | None:
        """``b_std`` for a module with a bias (None without one), or PyTorch's
        default, ``1/sqrt(3 fan_in)``."""
        if not present:
            return None
        return self.b_std if self.b_std is not None else 1 / math.sqrt(3 * fan_in)
