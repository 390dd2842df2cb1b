"""Chapter 5, paged optimizers: AdamW whose state is cut into pages that visit a small pool (QLoRA §3).

AdamW keeps two fp32 moments per parameter, m and v: 8 bytes per parameter. When they do not fit in device
memory, they can live in a large *host store* and visit a small *device pool* only while their parameter is
updated, the way virtual memory pages visit RAM:

    page      the m and v of page_bytes // 8 consecutive parameter elements
    pool      at most device_budget_bytes // page_bytes slots; full: the least recently used page leaves
    page-in   host -> pool before a page's elements are updated;  page-out: pool -> host when evicted

AdamW is elementwise, so a parameter can be updated page by page, and any budget of one page or more works.
Here host and pool are both CPU memory: the mechanism, made visible. minilora/paged.py builds the real
optimizer on this file (CUDA pinned memory and streams, prefetch, counters, torch's state_dict); tests/test_core.py
proves the two equal bit for bit.

Read first: `adamw_update_page` (the maths), `LRUPool` (which page leaves), then `PagedAdamW.step`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def adamw_update_page(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """One AdamW step, in place, on matching fp32 slices (Loshchilov & Hutter 2019, Algorithm 2):

        θ ← θ · (1 − lr·λ)                                   decoupled weight decay
        m ← β1·m + (1 − β1)·g                                first moment (written as a lerp)
        v ← β2·v + (1 − β2)·g²                               second moment
        θ ← θ − lr / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε)  bias-corrected step

    `step` is t, 1 for the first update. The operations and their order are torch.optim.AdamW's single-tensor
    path, so every element rounds as it would there; all are elementwise, so slices give what the whole gives.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class LRUPool:
    """Which page sits in which of `capacity` slots (None: unbounded), least recently used first (QLoRA §3, "Paged
    Optimizers", lets the GPU driver page; here the pool decides).

    Pure bookkeeping, no tensors: the pool decides, the optimizer moves the bytes. Slots are created one by
    one until `capacity` exist; then admitting a page evicts the least recently used page not `pinned`.
    """

    def __init__(self, capacity: int | None):
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
        """Give non-resident `page` a slot; return (slot, evicted page or None). It becomes the most recent."""
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


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (torch's numbers) whose m and v live in pages: a host store plus a pool of at most
    `device_budget_bytes` (None: no limit). Parameters: float32 and contiguous."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, page_bytes=4096,
                 device_budget_bytes=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.page_elements = page_bytes // 8  # fp32 m + fp32 v per element
        self.pool = LRUPool(None if device_budget_bytes is None else device_budget_bytes // page_bytes)
        self.slots = []  # slot -> (2, page_elements) fp32 tensor in the pool: row 0 is m, row 1 is v
        self.host = {}  # page -> (2, page_elements) fp32 tensor in the host store, written at its page-out
        self.num_pages = 0  # page numbers handed out; a parameter's pages are consecutive

    def make_resident(self, page: int, pinned: set) -> None:
        """Bring `page` into the pool: a hit, or a page-in (evicting, with write-back, if the pool is full)."""
        if page in self.pool:
            self.pool.touch(page)
            return
        slot, evicted = self.pool.admit(page, pinned)
        if slot == len(self.slots):
            self.slots.append(torch.empty(2, self.page_elements))
        buffer = self.slots[slot]
        if evicted is not None:  # page-out: write the victim back before its slot is overwritten
            self.host[evicted] = buffer.clone()
        if page in self.host:  # page-in
            buffer.copy_(self.host[page])
        else:  # a new page: Adam's moments start at zero
            buffer.zero_()

    def update_pages(self, group: dict, p: torch.Tensor, pages: list) -> None:
        """AdamW on the elements that resident `pages` cover, with m and v read from their pool slots."""
        state, (beta1, beta2) = self.state[p], group["betas"]
        for page in pages:
            start = (page - state["first_page"]) * self.page_elements
            stop = min(start + self.page_elements, p.numel())
            exp_avg, exp_avg_sq = self.slots[self.pool.slot_of[page]][:, : stop - start]
            adamw_update_page(p.view(-1)[start:stop], p.grad.reshape(-1)[start:stop], exp_avg, exp_avg_sq,
                              state["step"], group["lr"], beta1, beta2, group["eps"], group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step per parameter with a gradient, in chunks of pages that fit in the pool together."""
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:  # first touch: hand out consecutive page numbers (the pages are born on use)
                    state.update(step=0, first_page=self.num_pages, num_pages=-(-p.numel() // self.page_elements))
                    self.num_pages += state["num_pages"]
                state["step"] += 1
                pages = list(range(state["first_page"], state["first_page"] + state["num_pages"]))
                size = self.pool.capacity or len(pages)  # a parameter larger than the pool: several chunks
                for chunk in (pages[i:i + size] for i in range(0, len(pages), size)):
                    for page in chunk:
                        self.make_resident(page, pinned=set(chunk))  # no page of the chunk evicts another
                    self.update_pages(group, p, chunk)
