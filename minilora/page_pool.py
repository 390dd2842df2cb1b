"""The counters of a paged optimizer's page traffic (`PagingStats`).

Which page sits in which pool slot, and which one leaves a full pool, is minilora/core/paged.py's `LRUPool`;
minilora.paged.PagedAdamW counts here what its pages did, in total and step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
