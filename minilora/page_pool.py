"""The bookkeeping of a paged optimizer's device pool: which page sits in which slot, which page leaves when
the pool is full (the least recently used one), and the counters of page traffic.

Pure Python, no tensors: the pool decides, minilora.paged.PagedAdamW moves the bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from minilora.checks import check_int

# ----------------------------------------------------------------------------------------------------
# Which page leaves: least recently used
# ----------------------------------------------------------------------------------------------------


class LRUPool:
    """Bookkeeping for a pool of `capacity` slots (None: unbounded): which page sits in which slot.

    Pure Python, no tensors: the pool decides, the optimizer moves the bytes. `slot_of` is ordered from least
    to most recently used. Slots are created one by one until `capacity` exist, then reused: admitting a page
    into a full pool evicts the least recently used page that is not `pinned` (pages the optimizer is about
    to update or has just prefetched) and hands its slot over.
    """

    def __init__(self, capacity: int | None):
        if capacity is not None:
            check_int("capacity", capacity, 1, why=" (pages; None: unbounded)")
        self.capacity = capacity
        self.slot_of: OrderedDict = OrderedDict()  # page -> slot, least recently used first
        self.num_slots = 0  # slots created so far; never more than capacity

    def __contains__(self, page) -> bool:
        return page in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def touch(self, page) -> None:
        """Record a use of resident `page`: it becomes the most recently used."""
        self.slot_of.move_to_end(page)

    def victim(self, pinned=()):
        """The least recently used resident page that is not in `pinned`."""
        for page in self.slot_of:
            if page not in pinned:
                return page
        raise RuntimeError(f"all {len(self.slot_of)} resident pages are pinned: nothing can be evicted")

    def admit(self, page, pinned=()) -> tuple[int, object]:
        """Give non-resident `page` a slot; return (slot, evicted page or None). It becomes most recent."""
        if page in self.slot_of:
            raise ValueError(f"page {page!r} is already resident in slot {self.slot_of[page]}")
        evicted = None
        if self.capacity is None or self.num_slots < self.capacity:
            slot = self.num_slots
            self.num_slots += 1
        else:
            evicted = self.victim(pinned)
            slot = self.slot_of.pop(evicted)
        self.slot_of[page] = slot
        return slot, evicted


# ----------------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------------


@dataclass
class PagingStats:
    """Counters since the optimizer was built, and one `trace` entry per step (the same counters per step).

    bytes_moved counts whole pages in both directions: (page_ins + page_outs) · page_bytes.
    pool_bytes = resident pages · page_bytes; peak_pool_bytes never exceeds the budget.
    """

    page_ins: int = 0
    page_outs: int = 0
    prefetched: int = 0  # page-ins issued ahead of need (a subset of page_ins)
    new_pages: int = 0  # pages born zero-filled in the pool: no transfer
    hits: int = 0  # pages already resident when needed
    bytes_moved: int = 0
    pool_bytes: int = 0
    peak_pool_bytes: int = 0
    trace: list = field(default_factory=list)

    COUNTERS = ("page_ins", "page_outs", "prefetched", "new_pages", "hits", "bytes_moved")

    def snapshot(self) -> dict:
        return {name: getattr(self, name) for name in self.COUNTERS}
