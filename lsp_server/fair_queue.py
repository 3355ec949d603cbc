"""A queue that serves documents in turn, so one busy document cannot starve the others."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueClosed(Exception):
    """The queue was closed while a consumer waited."""


class FairQueue(Generic[T]):
    """Round-robin over keys, first-in first-out within a key; thread-safe."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()
        self._condition = threading.Condition()
        self._closed = False

    def put(self, key: str, item: T) -> None:
        with self._condition:
            self._queues.setdefault(key, deque()).append(item)
            self._condition.notify()

    def get(self) -> T:
        """The next item, taking keys in turn; blocks until one is there or the queue closes."""
        with self._condition:
            while not self._queues and not self._closed:
                self._condition.wait()
            if self._closed:
                raise QueueClosed
            return self._pop()

    def get_ready(self, limit: int) -> list[T]:
        """Up to ``limit`` more items that are waiting now, keys in turn; never blocks."""
        taken: list[T] = []
        with self._condition:
            while self._queues and len(taken) < limit and not self._closed:
                taken.append(self._pop())
        return taken

    def _pop(self) -> T:
        key, items = next(iter(self._queues.items()))
        item = items.popleft()
        del self._queues[key]
        if items:
            self._queues[key] = items  # back of the line
        return item

    def __len__(self) -> int:
        with self._condition:
            return sum(len(items) for items in self._queues.values())

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
