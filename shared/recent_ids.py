"""A bounded set of recently seen ids.

Several actors must recognise ids that ended a moment ago (late outputs of a
finished request, an abort that overtook its submit) without remembering every id
forever. ``RecentIds`` keeps the last ``capacity`` ids added; the oldest is
forgotten first. Every operation is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

Id = TypeVar("Id", bound=Hashable)


class RecentIds(Generic[Id]):
    """The ``capacity`` ids added last; adding a known id makes it the newest."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0, "a set that remembers nothing is a bug, not a setting"
        self.capacity = capacity
        # An OrderedDict is an insertion-ordered set with O(1) move-to-end and
        # pop-oldest; a deque plus a set would need two structures kept in step.
        self._ids: OrderedDict[Id, None] = OrderedDict()

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, item: Id) -> None:
        """Remember ``item`` as the newest id, forgetting the oldest past capacity."""
        self._ids[item] = None
        self._ids.move_to_end(item)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def discard(self, item: Id) -> bool:
        """Forget ``item``; True if it was remembered."""
        if item not in self._ids:
            return False
        del self._ids[item]
        return True
