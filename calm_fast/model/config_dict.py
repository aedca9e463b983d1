"""Config dataclasses from plain dicts (TOML tables, the JSON in export files), strictly.

Unknown keys are errors that list the known ones; nested dataclass fields take nested
tables; lists become the tuples the frozen configs hold.
"""
from __future__ import annotations

import dataclasses
import typing

from calm_fast.errors import CalmFastError


class ConfigError(CalmFastError, ValueError):
    """A config table with unknown keys or values its dataclass refuses."""


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value, hint):
    """TOML gives lists where the dataclasses hold tuples (hashable, frozen configs)."""
    origin = typing.get_origin(hint)
    if isinstance(value, list) and (origin is tuple or hint is tuple):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def build(cls, table: dict, where: str, base=None, error=None, **fixed):
    """Instantiate dataclass ``cls`` from a TOML table (or override ``base`` with it).
    Nested dataclass fields take nested tables."""
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = set(table) - names
    if unknown:
        raise (error or ConfigError)(f"[{where}]: unknown keys {sorted(unknown)}; "
                                     f"known: {sorted(names)}")
    hints = _hints(cls)
    kw = {}
    for k, v in table.items():
        hint = hints[k]
        sub = _dataclass_in(hint)
        if sub is not None and isinstance(v, dict):
            cur = getattr(base, k, None) if base is not None else None
            kw[k] = build(sub, v, f"{where}.{k}", base=cur, error=error)
        else:
            kw[k] = _coerce(v, hint)
    try:
        if base is not None:
            return dataclasses.replace(base, **kw, **fixed)
        return cls(**kw, **fixed)
    except (TypeError, ValueError) as e:
        raise (error or ConfigError)(f"[{where}]: {e}") from e


def _dataclass_in(hint):
    """The dataclass inside ``X`` or ``X | None``, else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for a in typing.get_args(hint):
        if dataclasses.is_dataclass(a):
            return a
    return None


def from_dict(cls, d: dict):
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output (export files)."""
    return build(cls, d, cls.__name__)
