"""Exercise 5: the two ideas inside a paged optimizer (Chapter 5, chapters/05-paged-optimizers.md).

This is minilora/core/paged.py with the bodies of the update and of the pool's decisions taken out. Fill in
every body that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_05_paged.py            # against this file

until everything passes. The book's solution is minilora/core/paged.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write: `adamw_update_page` (the AdamW update of one page of elements, in place) and the three methods
of `LRUPool` that decide which page leaves the device pool (`touch`, `victim`, `admit`).
Given: LRUPool.__init__, __contains__ and __len__ (the core's: the bookkeeping layout your methods work on), and
the core's PagedAdamW, which strings the core's versions of both together.
"""

from __future__ import annotations

import torch  # noqa: F401  (the tensors you update are torch tensors; in-place ops end in _)

from minilora.core import paged as core
from minilora.core.paged import PagedAdamW  # noqa: F401  (given)


def adamw_update_page(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """One AdamW step, in place, on matching fp32 slices. `step` = t is 1 for the first update."""
    raise NotImplementedError(
        "hint: four in-place steps: decoupled weight decay on the parameter, the two moment EMAs, then "
        "the bias-corrected update (Chapter 5, 'The update'). Why is the correction needed at t = 1?")


class LRUPool(core.LRUPool):
    """Bookkeeping for a pool of `capacity` slots (None: unbounded): which page sits in which slot.

    Given, from the core's LRUPool: `__init__(capacity)` sets `capacity`, `slot_of` and `num_slots`, and
    `page in pool` and `len(pool)` work. `slot_of` maps page -> slot and is ordered from least to most recently
    used (an OrderedDict: its first key is the oldest, move_to_end(key) makes a key the newest). Slots are
    numbered 0, 1, 2, ... in the order they are first needed (`num_slots` counts them); once `capacity` exist
    they are reused.
    """

    def touch(self, page) -> None:
        """Record a use of resident `page`: it becomes the most recently used."""
        raise NotImplementedError("hint: one line on the OrderedDict self.slot_of")

    def victim(self, pinned=()):
        """The least recently used resident page that is not in `pinned`."""
        raise NotImplementedError(
            "hint: the oldest resident page that is not pinned; if there is none, that is an error.")

    def admit(self, page, pinned=()) -> tuple[int, object]:
        """Give non-resident `page` a slot; return (slot, evicted page or None). It becomes most recent."""
        raise NotImplementedError(
            "hint: use a fresh slot while fewer than capacity exist, otherwise take the victim's slot; "
            "the admitted page becomes the most recent. Admitting a resident page is a caller's bug.")
