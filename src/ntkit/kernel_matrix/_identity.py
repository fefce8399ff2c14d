"""What a kernel store holds, from content rather than ``repr``: a SHA-256 digest of
a network's layers (types by module and qualified name, hyperparameters at full
precision, tensors by dtype, shape and bytes), walked recursively through their
attributes and containers.

Two networks that print alike (``AvgPool2d(2, count_include_pad=True)`` and
``False`` in older reprs, ``Erf(a=1.000001)`` and ``Erf(a=1.000002)``, two
``Elementwise`` lambdas) get different digests, except for what no digest can see:
the code of a Python function. A network that holds a function outside the
libraries ntkit builds on (a lambda, a function of the user's module, a bound
method of a user's object) is fingerprinted with the function's name only, and its
identity is *not well defined*: `Fingerprint.callables` names those functions, and a
store resumes onto such a network only under an explicit ``key=`` (see
`ntkit.kernel_matrix`).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import struct
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["LIBRARY_MODULES", "Fingerprint", "fingerprint"]

#: Top-level modules whose functions are identified by module and qualified name
#: (their code is versioned library code, not the caller's).
LIBRARY_MODULES = frozenset({"ntkit", "torch", "numpy", "scipy", "math", "builtins",
                             "operator", "functools"})
#: Deepest nesting of attributes and containers walked (a deeper object is refused).
MAX_DEPTH = 200
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
              types.BuiltinMethodType, types.MethodWrapperType, types.WrapperDescriptorType,
              types.MethodDescriptorType, types.ClassMethodDescriptorType, np.ufunc,
              staticmethod, classmethod)


@dataclass(frozen=True)
class Fingerprint:
    """The content identity of a network.

    Attributes:
        sha256: hex digest of the network's layer types and attributes.
        callables: qualified names of the user functions it holds (whose code the
            digest cannot see); empty when the digest identifies the network.
    """

    sha256: str
    callables: tuple[str, ...]


def fingerprint(obj: Any) -> Fingerprint:
    """The `Fingerprint` of ``obj`` (an ntkit network, or any object built of layers,
    containers, numbers, strings, tensors and arrays).

    Raises:
        ValueError: ``obj`` nests deeper than `MAX_DEPTH`.
    """
    walk = _Walk()
    walk.visit(obj, 0)
    return Fingerprint(walk.hash.hexdigest(), tuple(dict.fromkeys(walk.callables)))


class _Walk:
    """One depth-first walk feeding tagged, length-prefixed records to a SHA-256."""

    def __init__(self):
        self.hash = hashlib.sha256()
        self.callables: list[str] = []
        self.seen: dict[int, int] = {}  # id -> order of first visit (shared and cyclic refs)
        self.keep: list[Any] = []  # keeps visited objects alive, so ids stay unique

    def put(self, tag: str, data: bytes | str = b"") -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        self.hash.update(tag.encode() + struct.pack("<Q", len(data)) + data)

    def visit(self, obj: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(
                f"the kernel nests objects more than {MAX_DEPTH} levels deep; ntkit cannot "
                f"fingerprint it for a kernel store. Flatten the network, or compute it "
                f"without out=."
            )
        if obj is None or isinstance(obj, (bool, int, str, bytes)):
            self.put(type(obj).__name__, repr(obj))
        elif isinstance(obj, float):
            self.put("float", float.hex(obj))
        elif isinstance(obj, complex):
            self.put("complex", f"{obj.real.hex()} {obj.imag.hex()}")
        elif isinstance(obj, (np.generic, np.ndarray)) and not _object_array(obj):
            self._array("ndarray", str(obj.dtype), obj.shape, np.ascontiguousarray(obj))
        elif isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            self.put("torch." + type(obj).__name__, str(obj))
        elif isinstance(obj, type):
            self.put("type", _qualified(obj))
        elif isinstance(obj, enum.Enum):
            self.put("enum", f"{_qualified(type(obj))}.{obj.name}")
        else:
            self._reference(obj, depth)

    def _reference(self, obj: Any, depth: int) -> None:
        """An object that may be shared or cyclic: its first visit, or a back reference."""
        if id(obj) in self.seen:
            self.put("ref", str(self.seen[id(obj)]))
            return
        self.seen[id(obj)] = len(self.seen)
        self.keep.append(obj)
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.is_sparse:
                t = t.to_dense()
            data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._array("tensor", str(t.dtype), tuple(t.shape), data)
        elif isinstance(obj, (list, tuple)):
            self.put(f"seq {_qualified(type(obj))}", str(len(obj)))
            for item in obj:
                self.visit(item, depth + 1)
        elif isinstance(obj, dict):
            self._mapping(f"dict {_qualified(type(obj))}", obj, depth)
        elif isinstance(obj, (set, frozenset)):
            # an order-free digest: each element's own digest, sorted
            items = sorted(fingerprint(item).sha256 for item in obj)
            self.put(f"set {_qualified(type(obj))}", " ".join(items))
        elif isinstance(obj, functools.partial):
            self.put("partial")
            self.visit(obj.func, depth + 1)
            self.visit(obj.args, depth + 1)
            self.visit(obj.keywords, depth + 1)
        elif isinstance(obj, _FUNCTIONS):
            self._function(obj, depth)
        elif isinstance(obj, np.ndarray):  # of Python objects
            self.put("object-array", f"{obj.shape}")
            self.visit(obj.tolist(), depth + 1)
        else:
            self._object(obj, depth)

    def _array(self, tag: str, dtype: str, shape: tuple, data) -> None:
        """An array by dtype, shape and the SHA-256 of its bytes."""
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self.put(f"{tag} {dtype} {tuple(shape)}", hashlib.sha256(raw).hexdigest())

    def _mapping(self, tag: str, mapping: dict, depth: int) -> None:
        self.put(tag, str(len(mapping)))
        keys = list(mapping)
        if all(isinstance(k, str) for k in keys):
            keys.sort()
        for k in keys:
            self.visit(k, depth + 1)
            self.visit(mapping[k], depth + 1)

    def _function(self, fn: Any, depth: int) -> None:
        """A function by module and qualified name; outside the libraries (or a lambda or
        a local function anywhere) also a callable whose code the digest cannot see."""
        if isinstance(fn, (staticmethod, classmethod)):
            fn = fn.__func__
        if isinstance(fn, types.MethodType):
            self.put("method")
            self.visit(fn.__self__, depth + 1)
            fn = fn.__func__
        module = getattr(fn, "__module__", None) or getattr(
            getattr(fn, "__objclass__", None), "__module__", "") or ""
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        if (module.partition(".")[0] not in LIBRARY_MODULES or "<lambda>" in name
                or "<locals>" in name):
            # the user's code: known by its qualified name only (the same function run
            # as a script or imported has another module); key= vouches for it
            self.put("user function", name)
            self.callables.append(name)
        else:
            self.put("function", f"{module}:{name}")

    def _object(self, obj: Any, depth: int) -> None:
        """Any other object: its type, then its attributes (``__dict__`` and slots)."""
        cls = type(obj)
        state = dict(getattr(obj, "__dict__", {}))
        for klass in cls.__mro__:
            for slot in getattr(klass, "__dict__", {}).get("__slots__", ()):
                if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    state[f"{klass.__qualname__}.{slot}"] = getattr(obj, slot)
        if not state and callable(obj) and cls.__module__.partition(".")[0] not in LIBRARY_MODULES:
            self.callables.append(cls.__qualname__)
        elif not state and not hasattr(obj, "__dict__") and not _has_slots(cls):
            # an object of C code whose state Python cannot see (a torch.Generator)
            self.callables.append(f"{_qualified(cls)} object")
        self._mapping(f"object {_qualified(cls)}", state, depth)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _object_array(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.hasobject



def _has_slots(cls: type) -> bool:
    return any("__slots__" in vars(k) for k in cls.__mro__ if k is not object)
