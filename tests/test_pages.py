"""List pages (trainer/service/pages.py): every item once, in order, whatever changes between
calls; tokens refused when forged or used with other filters."""

from __future__ import annotations

import pytest

from trainer.errors import InvalidArgument
from trainer.service.pages import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, page


def _walk(items: list[int], size: int, filters: object = None) -> list[list[int]]:
    pages, token = [], ""
    while True:
        got, token = page(items, lambda i: [i], size, token, filters)
        pages.append(got)
        if not token:
            return pages


def test_pages_cover_every_item_once_in_order() -> None:
    items = list(range(7))
    assert _walk(items, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert _walk(items, 7) == [items]
    assert _walk([], 3) == [[]]
    assert len(page(list(range(500)), lambda i: [i], 0, "")[0]) == DEFAULT_PAGE_SIZE
    assert len(page(list(range(5000)), lambda i: [i], 10**6, "")[0]) == MAX_PAGE_SIZE


def test_items_removed_or_added_between_calls_neither_repeat_nor_shift() -> None:
    items = [10, 20, 30, 40, 50]
    first, token = page(items, lambda i: [i], 2, "")
    assert first == [10, 20]
    # The last item seen is deleted and an earlier one added before the next call.
    rest, token = page([5, 10, 30, 40, 50], lambda i: [i], 2, token)
    assert rest == [30, 40] and token


def test_a_token_is_only_good_for_its_own_filters() -> None:
    _, token = page(list(range(10)), lambda i: [i], 2, "", filters=["SUCCEEDED"])
    with pytest.raises(InvalidArgument, match="page_token: was issued for other filters"):
        page(list(range(10)), lambda i: [i], 2, token, filters=["FAILED"])
    for forged in ("nonsense", "e30=", token[:-4]):
        with pytest.raises(InvalidArgument, match="page_token"):
            page(list(range(10)), lambda i: [i], 2, forged, filters=["SUCCEEDED"])
    with pytest.raises(InvalidArgument, match="page_size"):
        page([1], lambda i: [i], -1, "")
