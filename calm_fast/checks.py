"""Checks for values where they enter calm_fast (a leaf: every layer may use them).

Each raises ArgumentTypeError or ArgumentError (both CalmFastError, and TypeError /
ValueError) with a message that names the argument, the value it got and what is allowed,
so a caller (a CLI flag, an HTTP field, a Python argument) can pass it on as is.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

from calm_fast.errors import ArgumentError, ArgumentTypeError


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def integer(name: str, v, lo: int | None = None, hi: int | None = None,
            none: bool = False) -> int | None:
    """An int (not a bool, not a float such as 2.5 or 2.0) in [lo, hi]."""
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer{' or None' if none else ''}, "
                                f"got {_show(v)} ({type(v).__name__})")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ArgumentError(f"{name} must be in [{lo if lo is not None else '-inf'}, "
                            f"{hi if hi is not None else 'inf'}], got {v}")
    return v


def real(name: str, v, lo: float | None = None, hi: float | None = None,
         none: bool = False, lo_open: bool = False) -> float | None:
    """A finite real number (int or float, not a bool or a string) in [lo, hi] (or (lo, hi]
    with ``lo_open``)."""
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number{' or None' if none else ''}, "
                                f"got {_show(v)} ({type(v).__name__})")
    v = float(v)
    if not math.isfinite(v):
        raise ArgumentError(f"{name} must be finite, got {v}")
    below = lo is not None and (v <= lo if lo_open else v < lo)
    if below or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise ArgumentError(f"{name} must be in {left}{lo if lo is not None else '-inf'}, "
                            f"{hi if hi is not None else 'inf'}], got {v:g}")
    return v


def instance(name: str, v, cls, what: str | None = None, none: bool = False):
    """``v`` is a ``cls`` (or None when allowed)."""
    if v is None and none:
        return None
    if not isinstance(v, cls):
        raise ArgumentTypeError(f"{name} must be {what or cls.__name__}"
                                f"{' or None' if none else ''}, got {type(v).__name__}")
    return v


def out_folder(name: str, v) -> Path:
    """A folder path to write into (str or os.PathLike), as a Path; an existing file of that
    name is an error rather than a FileExistsError from deep inside a writer. Nothing is
    created here: the caller makes the folder once its other checks have passed."""
    if isinstance(v, bool) or not isinstance(v, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a folder path (str or Path), got "
                                f"{_show(v)} ({type(v).__name__})")
    p = Path(v)
    if p.exists() and not p.is_dir():
        raise ArgumentError(f"{name} {str(p)!r} is a file, not a folder: choose a folder path")
    return p


PRECISIONS = ("fp32", "bf16", "int8")  # the CPU weight modes of the LM and its head


def precision(value, int8: bool = False) -> str:
    """A CPU weight mode: ``value`` one of PRECISIONS; the older ``int8=True`` flag means
    "int8" and must not contradict it."""
    instance("int8", int8, bool)
    if value not in PRECISIONS:
        raise ArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                            f"{_show(value)}")
    if int8 and value not in ("fp32", "int8"):
        raise ArgumentError(f"int8 and precision={value!r} disagree: pass one of them")
    return "int8" if int8 else value
