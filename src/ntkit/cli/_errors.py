"""The command line's one table of failures: exception type -> exit status and message.

Every command runs inside `Commands.invoke`, which turns an exception listed in
`FAILURES` into one ``Error: ...`` line on stderr and the row's exit status, and
lets anything else (a bug) through with its traceback. Library messages are
printed as the library wrote them; a command may put what it was doing in front
(`failing`), and a row may add a fix that only makes sense on the command line
(for example ``--memory-budget``). Nothing here rewrites a message's text.

Exit statuses: 1 an input that cannot be used or a computation that failed (every
typed error of `ntkit.errors`, whatever its builtin base, except the memory ones),
2 a usage error (click's own), 3 out of memory, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import click

from .. import errors as _library_errors
from .._data_files import DataFileError
from ..errors import (
    ConvergenceError,
    MemoryBudgetError,
    NonFiniteError,
    NotPositiveDefiniteError,
    StoreError,
)

__all__ = ["FAILURES", "LIBRARY_ERRORS", "CommandError", "Commands", "Failure", "failing",
           "failure_of", "library_errors"]


@dataclass(frozen=True)
class Failure:
    """How the command line reports one kind of exception.

    Attributes:
        exit_code: the process's exit status.
        prefix: words printed before the message (after ``Error: ``), e.g. what ran out.
        hint: a fix in the command line's own terms, printed after the message.
        text: the message of an exception (default: ``str(exc)``); for exceptions
            whose ``str`` is not written for people (``KeyboardInterrupt``,
            ``MemoryError``, an ``errno`` error).
    """

    exit_code: int = 1
    prefix: str = ""
    hint: str = ""
    text: Callable[[BaseException], str] = str


def _file_not_found(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{str(e.filename)!r} does not exist ({e.strerror})."
    return str(e)


def _memory(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return first or type(e).__name__


_OUT_OF_MEMORY = Failure(
    3, "out of memory: ", text=_memory,
    hint=" Lower --memory-budget (kernel tiles), use fewer examples, or float32 instead "
         "of float64.")


def _torch_out_of_memory() -> tuple[type[BaseException], ...]:
    """torch's OutOfMemoryError (a RuntimeError), if torch is imported: if it is not, it
    cannot have raised one (and the command line does not import torch to find out)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (oom,) if isinstance(oom, type) else ()


_SOLVE_HINT = " From the command line: a larger --diag-reg, or --dtype float64."


def library_errors() -> tuple[type[Exception], ...]:
    """Every exception class defined in `ntkit.errors` (warnings excluded), the ones the
    other helpers add included: the library's typed failures, whatever their builtin
    base (`ValueError`, `TypeError`, `RuntimeError`, ...)."""
    found = []
    for value in vars(_library_errors).values():
        if (isinstance(value, type) and issubclass(value, Exception)
                and not issubclass(value, Warning)
                and value.__module__ == _library_errors.__name__):
            found.append(value)
    return tuple(found)


#: `library_errors` when this module was imported, less the memory failures (they keep
#: exit status 3 and are not about the input, see `failing`).
LIBRARY_ERRORS = tuple(e for e in library_errors() if not issubclass(e, MemoryError))

#: The table, as (exception types, `Failure`) rows; the first row that matches is
#: used, so the most specific types come first. torch's OutOfMemoryError is matched
#: like `MemoryError` (`failure_of`).
FAILURES: tuple[tuple[tuple[type[BaseException], ...], Failure], ...] = (
    ((KeyboardInterrupt,), Failure(130, text=lambda e: "interrupted.")),
    # the library's typed failures (ntkit.errors): their messages name causes and fixes
    ((NotPositiveDefiniteError,), Failure(1, hint=_SOLVE_HINT)),
    ((ConvergenceError,), Failure(1, hint=_SOLVE_HINT)),
    ((NonFiniteError,), Failure(1, hint=" From the command line: --dtype float64, or "
                                        "rescale the inputs.")),
    ((MemoryBudgetError,), Failure(3, hint=" From the command line: a lower "
                                          "--memory-budget.")),
    ((MemoryError,), _OUT_OF_MEMORY),
    ((FileNotFoundError,), Failure(1, text=_file_not_found)),
    # an optional dependency that is not installed (ntkit's messages name the extra)
    ((ImportError,), Failure(1)),
    # what the user gave: DataFileError (files, labels), StoreError (a kernel store;
    # `ntkit kernel` words it with its own options), ConversionError, spec errors and
    # every other check at the library's boundary are ValueError/TypeError subclasses
    # whose messages are written for the user
    ((DataFileError, StoreError), Failure(1)),
    ((ValueError, TypeError, FloatingPointError), Failure(1)),
    # every other typed failure of ntkit.errors (a RuntimeError subclass, say): one line
    (LIBRARY_ERRORS, Failure(1)),
)


def failure_of(exc: BaseException) -> Failure | None:
    """The `Failure` row of ``exc``, or None when the command line does not handle it
    (a bug: its traceback is shown)."""
    for types, failure in FAILURES:
        if isinstance(exc, types):
            return failure
    oom = _torch_out_of_memory()
    if oom and isinstance(exc, oom):
        return _OUT_OF_MEMORY
    return None


class CommandError(click.ClickException):
    """One ``Error: ...`` line and an exit status (the message already composed)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class _Context(Exception):
    """An exception of the table, raised inside `failing`, with what the command did."""

    def __init__(self, context: str, error: BaseException):
        super().__init__(context)
        self.context = context
        self.error = error


def report(exc: BaseException, context: str = "") -> CommandError:
    """The `CommandError` for ``exc`` (a type in `FAILURES`), after ``context``."""
    failure = failure_of(exc)
    assert failure is not None
    head = f"{context}: " if context else ""
    return CommandError(f"{head}{failure.prefix}{failure.text(exc)}{failure.hint}",
                        failure.exit_code)


@contextlib.contextmanager
def failing(context: str, *,
            types: tuple[type[BaseException], ...] = (ValueError, TypeError,
                                                      FloatingPointError, *LIBRARY_ERRORS),
            unless: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Inside this block, an exception of ``types`` is reported after ``context``
    (``Error: <context>: <message>``), e.g. ``failing(f"fitting {name} failed")``.

    Other failures of the table (out of memory, interrupted), and those of ``unless``
    (for which ``context`` would be wrong: a NaN kernel is no mismatch of architecture
    and data), are reported without the context.
    """
    try:
        yield
    except types as e:
        if isinstance(e, unless) or failure_of(e) is None:   # None: not in the table
            raise
        raise _Context(context, e) from e


class Commands(click.Group):
    """A click group whose commands report the exceptions of `FAILURES` as one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _Context as c:
            raise report(c.error, c.context) from None
        except click.exceptions.Exit:
            raise
        except (click.ClickException, click.Abort):
            raise
        except (Exception, KeyboardInterrupt) as e:
            if failure_of(e) is None:
                raise
            raise report(e) from None
