"""Fan one call out over many nodes at once."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="fan-out")


def parallel(fn: Callable[[Any], T], items: Iterable[Any]) -> list[T | BaseException]:
    """Run ``fn`` over items concurrently; each result is the value or the exception raised."""
    items = list(items)

    def safe(item: Any) -> T | BaseException:
        try:
            return fn(item)
        except BaseException as exc:  # returned, so one failure does not hide the others
            return exc

    if len(items) <= 1:
        return [safe(i) for i in items]
    return list(_POOL.map(safe, items))
