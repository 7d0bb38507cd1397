"""List calls in pages, as Google's API guidelines describe (AIP-158).

A page token is opaque to clients: base64 of the last item's sort key and a digest of the
filters it was issued for, so a token used with other filters is refused rather than
silently skipping items. Pages are keyset-based: items added or removed between calls
neither repeat nor shift the next page.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from trainer.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def _filters_digest(filters: Any) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True).encode()).hexdigest()[:16]


def page(
    items: Sequence[T],
    key: Callable[[T], Any],
    page_size: int,
    page_token: str,
    filters: Any = None,
) -> tuple[list[T], str]:
    """The page of ``items`` after ``page_token``, and the token of the next page ("" on
    the last). ``key`` gives each item's position as a list of JSON values that ascends in
    the list's order and is unique per item (newest first: ``[-created_at, id]``)."""
    if page_size < 0:
        raise InvalidArgument("page_size", f"{page_size} is negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    digest = _filters_digest(filters)
    start = 0
    if page_token:
        try:
            state = json.loads(base64.urlsafe_b64decode(page_token.encode()))
            after, issued_for = state["after"], state["filters"]
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument("page_token", "is not a token this service issued") from None
        if issued_for != digest:
            raise InvalidArgument("page_token", "was issued for other filters")
        # The first item past the last one seen, even if that one is gone by now.
        start = next((i for i, it in enumerate(items) if _json(key(it)) > after), len(items))
    chunk = list(items[start : start + size])
    if start + size >= len(items) or not chunk:
        return chunk, ""
    token = {"after": key(chunk[-1]), "filters": digest}
    return chunk, base64.urlsafe_b64encode(json.dumps(token).encode()).decode()


def _json(value: Any) -> Any:
    """``value`` as it reads back from a token (tuples become lists)."""
    return json.loads(json.dumps(value))
