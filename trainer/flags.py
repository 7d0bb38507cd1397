"""Command-line flags made from a config dataclass, so each default and help text is written
once, on the field (``trainer.config.ServiceConfig``).

A field's metadata gives its ``help`` and, optionally, ``env`` (the environment variable that
stands in for an absent flag), ``flag`` (its name, else ``--field-name``), ``metavar``,
``choices`` and ``append`` (a repeatable flag; the variable's value comes first). Values are
parsed by the field's type (``int``, ``float``, ``Path`` or ``str``, each optionally
``| None``) or by the metadata's ``parse`` (which, for ``append``, gets the list). A ``bool``
field is a ``--name``/``--no-name`` pair; its variable reads 1/true/yes/on or 0/false/no/off.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (1/true/yes/on or 0/false/no/off)")


_PARSERS: dict[type, Callable[[Any], Any]] = {
    bool: parse_bool,
    int: int,
    float: float,
    Path: Path,
    str: str,
}


def _parser(cls: type, f: Field) -> Callable[[Any], Any]:
    if "parse" in f.metadata:
        return f.metadata["parse"]
    hint = get_type_hints(cls)[f.name]
    for kind, parse in _PARSERS.items():
        if hint is kind or kind in getattr(hint, "__args__", ()):
            return parse
    raise TypeError(f"{cls.__name__}.{f.name}: give the field a `parse` in its metadata")


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _chosen(cls: type, only: Iterable[str] | None) -> list[Field]:
    names = None if only is None else set(only)
    return [f for f in fields(cls) if f.init and (names is None or f.name in names)]


def add_flags(
    parser: argparse.ArgumentParser, cls: type, only: Iterable[str] | None = None
) -> None:
    """A flag on ``parser`` for each field of ``cls`` (or each one named in ``only``); its
    default is the environment variable's value, else the field's."""
    for f in _chosen(cls, only):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        env = os.environ.get(meta.get("env", "")) or None
        notes = [f"env {meta['env']}"] if "env" in meta else []
        if _default(f) not in (None, {}):
            notes.append(f"default {_default(f)}")
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "metavar": meta.get("metavar"),
            "help": meta["help"] + (f" ({'; '.join(notes)})" if notes else ""),
        }
        if meta.get("append"):
            kwargs.update(action="append", default=[env] if env else [])
        elif get_type_hints(cls)[f.name] is bool:
            default = parse_bool(env) if env is not None else _default(f)
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
            kwargs.pop("metavar")
        else:
            parse = _parser(cls, f)
            default = parse(env) if env is not None else _default(f)
            kwargs.update(type=parse, default=default, choices=meta.get("choices"))
        parser.add_argument(flag, **kwargs)


def from_flags(
    cls: type[T], args: argparse.Namespace, only: Iterable[str] | None = None, **given: Any
) -> T:
    """``cls`` from the flags ``add_flags`` made (with the same ``only``) and ``given``
    values for the fields they leave out; ``ValueError`` if the config refuses them."""
    values = dict(given)
    for f in _chosen(cls, only):
        value = getattr(args, f.name)
        values[f.name] = _parser(cls, f)(value) if f.metadata.get("append") else value
    return cls(**values)
