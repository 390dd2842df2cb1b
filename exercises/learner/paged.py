"""Exercise 5: the two ideas inside a paged optimizer (Chapter 5, chapters/05-paged-optimizers.md).

Fill in every body that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_05_paged.py            # against this file

until everything passes. The book's solution is minilora/paged.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write: `adamw_update_page` (the AdamW update of one page of elements, in place) and the three methods
of `LRUPool` that decide which page leaves the device pool (`touch`, `victim`, `admit`).
Given: LRUPool.__init__, __contains__ and __len__ (the bookkeeping layout your methods work on).
"""

from collections import OrderedDict

import torch  # noqa: F401  (the tensors you update are torch tensors; in-place ops end in _)


def adamw_update_page(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """One AdamW step, in place, on matching fp32 slices. `step` = t is 1 for the first update."""
    raise NotImplementedError(
        "hint: four lines of maths, all in place. (1) decoupled weight decay: θ ← θ·(1 − lr·λ), applied to "
        "the parameter itself, not added to the gradient. (2) m ← β1·m + (1 − β1)·g (exp_avg.lerp_(grad, "
        "1 - beta1) does exactly this). (3) v ← β2·v + (1 − β2)·g² (mul_ then addcmul_). (4) bias "
        "correction: θ ← θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε) (addcdiv_ with value=-step_size). "
        "Why is the correction needed at t = 1, when m and v started at zero?")


class LRUPool:
    """Bookkeeping for a pool of `capacity` slots (None: unbounded): which page sits in which slot.

    `slot_of` maps page -> slot and is ordered from least to most recently used (an OrderedDict: its
    first key is the oldest, move_to_end(key) makes a key the newest). Slots are numbered 0, 1, 2, ... in
    the order they are first needed (`num_slots` counts them); once `capacity` exist they are reused.
    """

    def __init__(self, capacity: int | None):
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                     or capacity < 1):
            raise ValueError(f"capacity must be None or an integer >= 1 (pages), got capacity={capacity!r}")
        self.capacity = capacity
        self.slot_of: OrderedDict = OrderedDict()  # page -> slot, least recently used first
        self.num_slots = 0  # slots created so far; never more than capacity

    def __contains__(self, page) -> bool:
        return page in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def touch(self, page) -> None:
        """Record a use of resident `page`: it becomes the most recently used."""
        raise NotImplementedError("hint: one line on the OrderedDict self.slot_of")

    def victim(self, pinned=()):
        """The least recently used resident page that is not in `pinned`."""
        raise NotImplementedError(
            "hint: walk self.slot_of from oldest to newest and return the first page not in pinned. If "
            "every resident page is pinned there is no victim: raise RuntimeError (never evict a page that "
            "is being updated or was just prefetched).")

    def admit(self, page, pinned=()) -> tuple[int, object]:
        """Give non-resident `page` a slot; return (slot, evicted page or None). It becomes most recent."""
        raise NotImplementedError(
            "hint: a page already resident is a caller's bug (ValueError). While fewer than capacity "
            "slots exist (or capacity is None), the new slot is number self.num_slots (then count it) and "
            "nothing is evicted. Otherwise evict self.victim(pinned): pop it from slot_of and hand its slot "
            "to `page`. Either way slot_of[page] = slot, at the most recent end.")
