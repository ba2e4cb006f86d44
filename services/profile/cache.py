"""In-memory state kept between batches, trusted only when the row's sequence agrees.

Every change to a profile or an account, by any replica, raises its row's ``sequence``
under the row lock. A unit of work locks the row, reads the sequence and uses a cached
state only when it carries the same number; otherwise it reads the row again. Entries are
taken out of the cache while a unit works on them, so a unit that fails leaves nothing
half-changed behind.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Generic, Protocol, TypeVar

__all__ = ["StateCache"]


class _Sequenced(Protocol):
    @property
    def sequence(self) -> int: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=_Sequenced)


class StateCache(Generic[K, V]):
    """A bounded, least-recently-used map of states by key."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def take(self, key: K, sequence: int) -> V | None:
        """Removes and returns the state of ``key`` if it is at ``sequence``."""
        state = self._entries.pop(key, None)
        if state is not None and state.sequence == sequence:
            self.hits += 1
            return state
        self.misses += 1
        return None

    def put(self, key: K, state: V) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = state
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def discard(self, keys: Iterable[K]) -> None:
        for key in keys:
            self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
