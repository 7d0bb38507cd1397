"""Validation of every name that ends up in a path or a served model name.

Names are checked before any path is built from them. The character set is
ASCII only, so Unicode look-alikes (fullwidth letters, zero-width spaces) and normalisation
tricks never reach the filesystem, and names are compared case-sensitively but
must be unique case-insensitively within a tenant (see ``fold``) so two names
cannot collide on a case-insensitive filesystem.
"""

from __future__ import annotations

import re

from trainer.errors import InvalidArgument

MAX_NAME_LEN = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ID_RE = re.compile(r"(ds|job)-[0-9a-f]{16}")


def check_name(value: str, field: str) -> str:
    """Return ``value`` if it is a valid tenant, dataset or adapter name.

    Raises ``InvalidArgument`` naming ``field`` otherwise.
    """
    if not isinstance(value, str) or not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_NAME_LEN:
        raise InvalidArgument(field, f"is {len(value)} characters; at most {MAX_NAME_LEN}")
    if not value.isascii() or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            field,
            f"{value!r} may use only ASCII letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit",
        )
    if ".." in value:
        raise InvalidArgument(field, f"{value!r} must not contain '..'")
    return value


def check_id(value: str, field: str) -> str:
    """Return ``value`` if it has the shape of a server-assigned id."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidArgument(field, f"{value!r} is not a valid id")
    return value


def fold(name: str) -> str:
    """The case-folded key under which names must be unique."""
    return name.lower()


def served_name(tenant: str, adapter: str) -> str:
    """The OpenAI ``model`` of a tenant's adapter: ``<tenant>/<adapter>``."""
    return f"{check_name(tenant, 'tenant')}/{check_name(adapter, 'adapter_name')}"


def split_served_name(model: str) -> tuple[str, str] | None:
    """Split ``<tenant>/<adapter>`` into its parts, or None if it is not one."""
    parts = model.split("/")
    if len(parts) != 2:
        return None
    try:
        return check_name(parts[0], "tenant"), check_name(parts[1], "adapter")
    except InvalidArgument:
        return None
