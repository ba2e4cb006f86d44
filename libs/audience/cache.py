"""In-memory state kept between transactions, trusted only when its row's number agrees.

Every change to a row's state, by any replica, raises a number on the row under the row
lock (the profile service's ``sequence``, the segment engine's ``revision``). A unit of
work locks the row, reads the number and uses a cached state only when it carries the same
one; otherwise it reads the state again. Entries are taken out of the cache while a unit
works on them, so a unit that fails leaves nothing half-changed behind.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, Protocol, TypeVar

__all__ = ["StateCache"]


class _Sequenced(Protocol):
    @property
    def sequence(self) -> int: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=_Sequenced)


class StateCache(Generic[K, V]):
    """A least-recently-used map of states by key, bounded by the states' total weight.

    Args:
        budget: the most weight held (0 keeps nothing).
        weigh: a state's weight (its approximate size in bytes), taken when it is put.
    """

    def __init__(self, budget: int, weigh: Callable[[V], int]) -> None:
        self.budget = budget
        self._weigh = weigh
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.weight = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def take(self, key: K, sequence: int) -> V | None:
        """Removes and returns the state of ``key`` if it is at ``sequence``."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.weight -= entry[1]
            if entry[0].sequence == sequence:
                self.hits += 1
                return entry[0]
        self.misses += 1
        return None

    def put(self, key: K, state: V) -> None:
        if self.budget <= 0:
            return
        weight = self._weigh(state)
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.weight -= previous[1]
        self._entries[key] = (state, weight)
        self.weight += weight
        while self.weight > self.budget:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.weight -= dropped

    def discard(self, keys: Iterable[K]) -> None:
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.weight -= entry[1]

    def clear(self) -> None:
        self._entries.clear()
        self.weight = 0
