"""Paged AdamW for real: minilora/core/paged.py's optimizer, with CUDA's pinned memory and streams, prefetch,
counters and torch's state_dict (chapter 5).

The idea is minilora/core/paged.py: AdamW's two fp32 moments cut into pages of `page_bytes` that visit a small
device pool from a large host store, the least recently used page leaving when the pool is full, the update
done page by page (`adamw_update_page`, elementwise). This file uses the core's `adamw_update_page` and
`LRUPool` as they are, and adds what a real run needs:

    on CUDA     the host store is pinned CPU memory and the pool GPU memory; copies run on a side stream
    prefetch    while one chunk is updated, the next chunk's pages are brought into the slots that remain
    pages       sized to the parameters (`page_bytes_for`); bf16/fp16 parameters updated in fp32
    accounting  `stats` (minilora.page_pool.PagingStats): page-ins, page-outs, hits, bytes, one trace per step
    resuming    `state_dict` / `load_state_dict` in torch.optim.AdamW's layout
    checks      every argument, once, in the constructor

On CPU both the host store and the pool are ordinary CPU memory: the same code runs, and nothing is saved.
Read first: `PagedAdamW.step`. The numerics are those of torch.optim.AdamW (foreach=False), operation for
operation; tests/test_core.py proves this optimizer equal to the core's, tests/test_paged.py to torch.optim.AdamW
and bitsandbytes.optim.PagedAdamW32bit.
"""

from __future__ import annotations

import contextlib
import math

import torch

from minilora.checks import check_int, check_number
from minilora.core.paged import LRUPool, adamw_update_page  # the core's, used as they are (and importable here)
from minilora.page_pool import PagingStats

STATE_BYTES_PER_ELEMENT = 8  # fp32 exp_avg (4 bytes) + fp32 exp_avg_sq (4 bytes)
DEFAULT_PAGE_BYTES = 2 * 2**20  # 2 MiB, the large-page size CUDA unified memory migrates at most
MIN_PAGE_BYTES = 4096  # 4 KiB, the small-page size of CPUs and of unified memory
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def adamw_state_bytes(params) -> int:
    """Bytes of AdamW state (two fp32 moments) for `params`: what plain AdamW keeps in device memory."""
    return sum(STATE_BYTES_PER_ELEMENT * p.numel() for p in params)


# ----------------------------------------------------------------------------------------------------
# Checking inputs
# ----------------------------------------------------------------------------------------------------


def check_adamw_options(lr, betas, eps, weight_decay) -> None:
    """Raise ValueError naming the argument and value for anything AdamW cannot use."""
    check_number("lr", lr, 0, low_open=True)
    check_number("eps", eps, 0, low_open=True, why=" (it keeps m / (√v + eps) finite)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1) (decay rates of m and v), got betas={betas!r}")
    for name, beta in zip(("betas[0]", "betas[1]"), betas):
        check_number(name, beta, 0, 1, high_open=True, why=" (decay rates of m and v)")
    check_number("weight_decay", weight_decay, 0)


def check_paging(page_bytes, device_budget_bytes) -> None:
    """Raise ValueError for a page size or device budget the pool cannot use."""
    check_int("page_bytes", page_bytes, 1)
    if page_bytes % STATE_BYTES_PER_ELEMENT:
        raise ValueError(f"page_bytes must be a positive multiple of {STATE_BYTES_PER_ELEMENT} (fp32 "
                         f"exp_avg + fp32 exp_avg_sq per element), got page_bytes={page_bytes!r}")
    if device_budget_bytes is not None:
        check_int("device_budget_bytes", device_budget_bytes, page_bytes,
                  why=" (room for one page; None: no limit)")


def page_bytes_for(params) -> int:
    """The default page size: the smallest power of two holding the largest parameter's m and v, between
    MIN_PAGE_BYTES (4 KiB) and DEFAULT_PAGE_BYTES (2 MiB).

    Every parameter starts a page of its own, so fixed 2 MiB pages would spend 2 MiB of pool on a 16 × 64
    LoRA matrix whose moments need 8 KiB. Sizing the page to the parameters keeps LoRA's many small matrices
    cheap, and full fine-tuning's large ones still move in 2 MiB pieces.
    """
    if not params:
        raise ValueError("params is empty: PagedAdamW needs at least one tensor to optimize (did the model "
                         "have no parameter with requires_grad=True?)")
    largest = max(p.numel() for p in params) * STATE_BYTES_PER_ELEMENT
    return min(DEFAULT_PAGE_BYTES, max(MIN_PAGE_BYTES, 1 << (largest - 1).bit_length()))


# ----------------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------------


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose state lives in pages: a host store plus a device pool of at most `device_budget_bytes`.

    Arguments as torch.optim.AdamW (lr, betas, eps, weight_decay; parameter groups may override them), plus
    page_bytes           size of one page; it holds m and v for page_bytes // 8 consecutive elements
                         (None: `page_bytes_for(params)`, a power of two that fits the largest parameter)
    device_budget_bytes  device memory the pool may use (None: no limit, pages never leave the device)

    Parameters: fp32, bf16 or fp16, contiguous, all on one device. State is always fp32; bf16/fp16
    parameters are updated in fp32 and rounded back. Parameters whose .grad is None are skipped.
    `stats` (a PagingStats) counts page traffic; `state_bytes` is the state created so far.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 page_bytes=None, device_budget_bytes=None):
        check_adamw_options(lr, betas, eps, weight_decay)
        if page_bytes is None:
            # params may be a generator (model.parameters()) or groups holding generators: read them once.
            params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
            page_bytes = page_bytes_for([p for g in params for p in (g["params"] if isinstance(g, dict) else [g])])
        check_paging(page_bytes, device_budget_bytes)
        self.page_bytes = page_bytes
        self.page_elements = page_bytes // STATE_BYTES_PER_ELEMENT
        self.device_budget_bytes = device_budget_bytes
        self.stats = PagingStats()
        self._device = None  # the parameters' device, fixed by the first parameter
        self._slots = []  # slot index -> (2, page_elements) fp32 tensor in the pool (row 0: m, row 1: v)
        self._copy_stream = None  # CUDA side stream for transfers (None on CPU)
        self._reset_pages()
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _reset_pages(self) -> None:
        capacity = None if self.device_budget_bytes is None else self.device_budget_bytes // self.page_bytes
        self._pool = LRUPool(capacity)
        self._host = {}  # page -> (2, page_elements) fp32 tensor in host memory, made at its first page-out
        self._num_pages = 0  # pages handed out so far; a parameter's pages are consecutive numbers
        self.stats.pool_bytes = 0

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state created so far (whole pages): where it lives is up to the pool."""
        return self._num_pages * self.page_bytes

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        settings = {k: param_group.get(k, self.defaults[k]) for k in ("lr", "betas", "eps", "weight_decay")}
        check_adamw_options(**settings)
        for p in params:
            self._check_param(p)
        super().add_param_group({**param_group, "params": params})

    def _check_param(self, p) -> None:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params must be tensors, got {type(p).__name__}")
        if p.dtype not in PARAM_DTYPES:
            raise ValueError(f"parameter dtype must be one of {PARAM_DTYPES} (state is fp32), got {p.dtype}")
        if not p.is_contiguous():
            raise ValueError(f"parameters must be contiguous (pages cover consecutive elements), got one of "
                             f"shape {tuple(p.shape)} with strides {p.stride()}")
        if self._device is None:
            self._device = p.device
            if p.device.type == "cuda":
                self._copy_stream = torch.cuda.Stream(p.device)
        elif p.device != self._device:
            raise ValueError(f"all parameters must share one device (the pool lives there): "
                             f"got {p.device} after {self._device}")

    # --- per-parameter state: a step counter and a run of consecutive page numbers ----------------------

    def _state_of(self, p) -> dict:
        state = self.state[p]
        if not state:  # first touch: hand out page numbers; the pages themselves are born on first use
            state["step"] = 0
            state["first_page"] = self._num_pages
            state["num_pages"] = math.ceil(p.numel() / self.page_elements)
            self._num_pages += state["num_pages"]
        return state

    def _pages_of(self, p) -> list:
        state = self._state_of(p)
        return list(range(state["first_page"], state["first_page"] + state["num_pages"]))

    def _chunks_of(self, p) -> list:
        """p's pages cut into chunks that fit in the pool (one chunk unless p's state exceeds the budget)."""
        pages = self._pages_of(p)
        size = self._pool.capacity or max(len(pages), 1)
        return [pages[i:i + size] for i in range(0, len(pages), size)]

    # --- streams: no-ops on CPU, where every copy is synchronous --------------------------------------

    def _on_copy_stream(self):
        return torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext()

    def _copies_wait_for_compute(self) -> None:
        """A slot about to be refilled may still be read or written by queued updates: wait for them."""
        if self._copy_stream is not None:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self._device))

    def _compute_waits_for_copies(self) -> None:
        """The update must not start before its pages have arrived."""
        if self._copy_stream is not None:
            torch.cuda.current_stream(self._device).wait_stream(self._copy_stream)

    def _synchronize(self) -> None:
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
            torch.cuda.current_stream(self._device).synchronize()

    # --- moving pages ------------------------------------------------------------------------------

    def _host_page(self, page):
        if page not in self._host:
            pinned = self._device is not None and self._device.type == "cuda"
            self._host[page] = torch.zeros(2, self.page_elements, pin_memory=pinned)
        return self._host[page]

    def _make_resident(self, page, pinned, prefetch: bool) -> None:
        """Bring `page` into the pool, evicting (with write-back) the least recently used unpinned page."""
        if page in self._pool:
            self._pool.touch(page)
            if not prefetch:
                self.stats.hits += 1
            return
        slot, evicted = self._pool.admit(page, pinned)
        if slot == len(self._slots):
            self._slots.append(torch.empty(2, self.page_elements, device=self._device))
        buffer = self._slots[slot]
        with self._on_copy_stream():
            if evicted is not None:  # page-out: write the victim back before its slot is overwritten
                self._host_page(evicted).copy_(buffer, non_blocking=True)
                self.stats.page_outs += 1
            if page in self._host:  # page-in
                buffer.copy_(self._host[page], non_blocking=True)
                self.stats.page_ins += 1
                if prefetch:
                    self.stats.prefetched += 1
            else:  # a new page: Adam's moments start at zero
                buffer.zero_()
                self.stats.new_pages += 1
        self.stats.bytes_moved = (self.stats.page_ins + self.stats.page_outs) * self.page_bytes
        self.stats.pool_bytes = len(self._pool) * self.page_bytes
        self.stats.peak_pool_bytes = max(self.stats.peak_pool_bytes, self.stats.pool_bytes)

    def _page_in_chunk(self, pages) -> set:
        """Demand paging: make every page of the chunk resident, pinned so none evicts another."""
        pinned = set(pages)
        self._copies_wait_for_compute()
        for page in pages:
            self._make_resident(page, pinned, prefetch=False)
        self._compute_waits_for_copies()
        return pinned

    def _prefetch(self, pages, pinned: set) -> None:
        """Bring the next chunk's pages into the slots left over, in order, without evicting pinned pages."""
        self._copies_wait_for_compute()
        for page in pages:
            if self._pool.capacity is not None and len(pinned) >= self._pool.capacity:
                break
            pinned.add(page)
            self._make_resident(page, pinned, prefetch=True)

    # --- the step -------------------------------------------------------------------------------------

    def _update_chunk(self, group: dict, p, pages) -> None:
        """AdamW on the elements the chunk's pages cover, page by page, with m and v read from the pool."""
        state = self.state[p]
        beta1, beta2 = group["betas"]
        flat_param, flat_grad = p.detach().view(-1), p.grad.reshape(-1)
        for page in pages:
            start = (page - state["first_page"]) * self.page_elements
            end = min(start + self.page_elements, p.numel())
            buffer = self._slots[self._pool.slot_of[page]]
            param = flat_param[start:end]
            param32 = param.float()  # the same tensor for fp32 parameters, an fp32 copy for bf16/fp16
            adamw_update_page(param32, flat_grad[start:end].float(), buffer[0, : end - start],
                              buffer[1, : end - start], state["step"], group["lr"], beta1, beta2,
                              group["eps"], group["weight_decay"])
            if param32 is not param:
                param.copy_(param32)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient, chunk by chunk, prefetching the next chunk."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        before = self.stats.snapshot()
        chunks = []  # (group, parameter, pages), in update order
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                self._state_of(p)["step"] += 1
                chunks += [(group, p, pages) for pages in self._chunks_of(p)]
        for i, (group, p, pages) in enumerate(chunks):
            pinned = self._page_in_chunk(pages)
            if i + 1 < len(chunks):
                self._prefetch(chunks[i + 1][2], pinned)  # overlaps the update below on CUDA
            self._update_chunk(group, p, pages)
        after = self.stats.snapshot()
        self.stats.trace.append({"step": len(self.stats.trace) + 1,
                                 **{name: after[name] - before[name] for name in after},
                                 "pool_bytes": self.stats.pool_bytes})
        return loss

    # --- saving and resuming --------------------------------------------------------------------------

    def _read_page(self, page):
        if page in self._pool:
            return self._slots[self._pool.slot_of[page]].to("cpu", copy=True)
        if page in self._host:
            return self._host[page].clone()
        return torch.zeros(2, self.page_elements)  # handed out but never used

    def _moments(self, p) -> tuple:
        """exp_avg and exp_avg_sq of p, gathered from pool and host into fp32 CPU tensors shaped like p."""
        pages = torch.cat([self._read_page(page) for page in self._pages_of(p)], dim=1)
        return pages[0, : p.numel()].view(p.shape).clone(), pages[1, : p.numel()].view(p.shape).clone()

    def state_dict(self) -> dict:
        """The state in torch.optim.AdamW's layout (step, exp_avg, exp_avg_sq per parameter index, fp32, CPU).

        Reading it moves no pages and changes no statistics; torch.optim.AdamW can load it too.
        """
        self._synchronize()
        state, groups, index = {}, [], 0
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                if self.state.get(p):
                    exp_avg, exp_avg_sq = self._moments(p)
                    state[index] = {"step": torch.tensor(float(self.state[p]["step"])),
                                    "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what state_dict() (ours or torch.optim.AdamW's) saved; all pages start on the host."""
        saved_groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        saved_sizes = [len(g["params"]) for g in saved_groups]
        if sizes != saved_sizes:
            raise ValueError(f"state_dict has parameter groups of sizes {saved_sizes}, "
                             f"this optimizer has {sizes}")
        self._synchronize()
        self.state.clear()
        self._reset_pages()
        for group, saved in zip(self.param_groups, saved_groups):
            for unsupported in ("amsgrad", "maximize"):
                if saved.get(unsupported):
                    raise ValueError(f"state_dict was saved with {unsupported}=True, which PagedAdamW lacks")
            settings = {k: saved[k] for k in ("lr", "eps", "weight_decay")} | {"betas": tuple(saved["betas"])}
            check_adamw_options(**settings)
            group.update(settings)
            for p, index in zip(group["params"], saved["params"]):
                if index in state_dict["state"]:
                    self._load_moments(p, state_dict["state"][index])

    def _load_moments(self, p, saved: dict) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(saved[key].shape) != tuple(p.shape):
                raise ValueError(f"state_dict {key} has shape {tuple(saved[key].shape)}, "
                                 f"the parameter {tuple(p.shape)}")
        state = self._state_of(p)
        state["step"] = int(saved["step"])
        moments = torch.stack([saved["exp_avg"].reshape(-1), saved["exp_avg_sq"].reshape(-1)]).float().cpu()
        for k, page in enumerate(self._pages_of(p)):
            start = k * self.page_elements
            end = min(start + self.page_elements, p.numel())
            self._host_page(page)[:, : end - start] = moments[:, start:end]
