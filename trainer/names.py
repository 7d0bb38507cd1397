"""Validation of every name that ends up in a path or a served model name.

Names are checked before any path is built from them. The character set is
ASCII only, so Unicode look-alikes (fullwidth letters, zero-width spaces) and normalisation
tricks never reach the filesystem, and names are compared case-sensitively but
must be unique case-insensitively within a tenant (see ``fold``) so two names
cannot collide on a case-insensitive filesystem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainer.errors import InvalidArgument

MAX_NAME_LEN = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# An adapter version as the store names its folders (``trainer.layout.VERSION_RE``, which
# cannot be imported here: layout imports this module). ``[0-9]``, not ``\d``: ``\d``
# also matches other scripts' digits.
_VERSION_RE = re.compile(r"v[0-9]{4,9}")
# Between a served name and a version. Not a name character, so never ambiguous.
VERSION_SEP = "@"
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


def check_version(value: str, field: str) -> str:
    """Return ``value`` if it has the shape of an adapter version (``v0001``)."""
    if not isinstance(value, str) or not _VERSION_RE.fullmatch(value):
        raise InvalidArgument(field, f"{value!r} is not a version like 'v0001'")
    return value


def fold(name: str) -> str:
    """The case-folded key under which names must be unique."""
    return name.lower()


def served_name(tenant: str, adapter: str, version: str | None = None) -> str:
    """The OpenAI ``model`` of a tenant's adapter: ``<tenant>/<adapter>``, which serves
    the current version, or ``<tenant>/<adapter>@<version>``, which serves that one."""
    name = f"{check_name(tenant, 'tenant')}/{check_name(adapter, 'adapter_name')}"
    if version is None:
        return name
    return f"{name}{VERSION_SEP}{check_version(version, 'version')}"


@dataclass(frozen=True)
class ServedName:
    """A parsed served name: ``version`` is None for the plain name (the current version)."""

    tenant: str
    adapter: str
    version: str | None = None

    def __str__(self) -> str:
        return served_name(self.tenant, self.adapter, self.version)


def parse_served_name(model: str) -> ServedName | None:
    """Parse ``<tenant>/<adapter>`` or ``<tenant>/<adapter>@<version>``, or None if
    ``model`` is neither.

    Every part is validated (``check_name``, ``check_version``), so ``str()`` of the
    result is ``model`` again: one served name has one spelling. ``@`` without a valid
    version after it (``t/a@``, ``t/a@x1``, ``t/a@v1``), a second ``@`` and an ``@``
    in the tenant part are all refused.
    """
    if not isinstance(model, str):
        return None
    name, sep, version = model.partition(VERSION_SEP)
    parts = name.split("/")
    if len(parts) != 2:
        return None
    try:
        tenant, adapter = check_name(parts[0], "tenant"), check_name(parts[1], "adapter")
        if sep:
            # A second "@" lands in ``version`` and fails its check.
            return ServedName(tenant, adapter, check_version(version, "version"))
    except InvalidArgument:
        return None
    return ServedName(tenant, adapter)


def split_served_name(model: str) -> tuple[str, str] | None:
    """Split ``<tenant>/<adapter>`` into its parts, or None if it is not one.

    A versioned name (``<tenant>/<adapter>@v0002``) is not one: see ``parse_served_name``.
    """
    parsed = parse_served_name(model)
    if parsed is None or parsed.version is not None:
        return None
    return parsed.tenant, parsed.adapter
