"""The fast kernels beside the readable ones: blockwise 4-bit encode and decode in cache-sized steps.

minilora/core/nf4.py shows the algorithm in one piece (`quantize_4bit`, `dequantize_4bit`). This file runs the
same arithmetic in a way that is fast on a CPU, and nothing else; tests/test_core.py and tests/test_kernels.py
prove every result equal to the core's, bit for bit. It is on the ground floor: it imports nothing of ours, and
the tables (16 levels, 256 byte pairs, midpoints) are handed in by minilora/nf4.py.

Read first: `decode_full_blocks`, then `encode_full_blocks`. Why they are shaped like this (the measurements
behind each point are in benchmarks/MEASUREMENTS.md):

1. Few, cheap passes over memory. A byte holds two 4-bit codes, so a 256-entry table of level *pairs*
   decodes a byte with one gather, instead of two shifts, two gathers and an interleave. The product
   level · absmax is formed in float32 in the gathered levels, then copied into the output dtype (one
   rounding, as in the core and in bitsandbytes); `torch.mul(..., out=bf16)` would go through a hidden float32
   temporary and is slower.
2. Steps of CHUNK_ELEMENTS values. Each step is a dozen or more Python-level torch calls (~2 us each), so
   a step must be large enough to hide that, and small enough that its temporaries stay in cache (a
   whole-tensor version of the same ops is 2-3x slower: every temporary goes to RAM and back).
3. No small parallel regions: every ATen op of a kernel, and of the checks around it, runs with one
   intra-op thread (`one_intra_op_thread`). Opening a parallel region per op collapsed beside a busy process
   (issue 12): each of hundreds of regions waited for a descheduled thread. Parallelism is ours instead, and
   coarse (`run_steps`): with torch.get_num_threads() = T > 1, the caller and T - 1 worker threads take whole
   steps from one shared queue until none is left, so a descheduled thread delays at most the step it holds,
   not half the tensor. The torch ops release the GIL; the Python between them is ~10 % of a step. (The
   compiled decode of minilora.native applies the same rule inside one parallel region of torch's own
   threads: its steps need no Python, and after any parallel op torch's idle workers spin on the cores that
   threads of ours would need.)
4. On a GPU the opposite holds (each op is a kernel launch), so there a step is the whole tensor. Under
   torch.compile nf4.py hands the compiler the core's formula instead, which it fuses into one loop.
5. No fresh output per call where it is safe: a newly allocated 4096 x 4096 bf16 tensor costs ~8,200 page
   faults, about as long as the decode itself. `scratch` keeps one buffer per (size, dtype, device,
   thread) for callers whose result never escapes (Linear4bit's forward and backward).

Tables are built once per device and kept in `cached` (never rebuilt on the hot path: a per-call rebuild
cost a measurable share of each decode and stopped `torch.compile(fullgraph=True)` at a `.tolist()`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

CHUNK_ELEMENTS = 1 << 18  # values per step on a CPU, encode and decode (point 2): the fastest measured
# The compiled decode (minilora.native) keeps no temporaries and hands out its steps in C++, so steps only need
# to be few enough to hand out cheaply and many enough to share: at most 2^20 values (16 steps of a 4096 x 4096;
# 2^18 to 2^22 measured alike there), and smaller for a smaller layer, down to 2^16, so that it still has 2 steps
# per thread (a 512 x 1408 layer at 2 threads: one step of 2^20 left a core idle; benchmarks/MEASUREMENTS.md).
FUSED_STEP_ELEMENTS = 1 << 20
FUSED_MIN_STEP_ELEMENTS = 1 << 16

_CACHE: dict = {}


def cached(key: tuple, build):
    """`build()`'s result, computed once per `key` (which names the device) and kept for the process.

    For small constant tables only. Callers must never modify what they get back: it is shared.
    """
    value = _CACHE.get(key)
    if value is None:
        value = build()
        _CACHE[key] = value
    return value


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable 1-D buffer of `numel` elements (point 5), one per calling thread.

    Only for results that are consumed before the next call with the same size on the same thread, e.g. a
    decoded weight that one matmul reads and then drops. The contents are garbage on return.
    """
    key = ("scratch", numel, dtype, torch.device(device), threading.get_ident())
    return cached(key, lambda: torch.empty(numel, dtype=dtype, device=device))


def step_elements(device: torch.device, blocksize: int, n: int) -> int:
    """How many values one step handles: CHUNK_ELEMENTS on a CPU (point 2), everything at once elsewhere."""
    if device.type != "cpu":
        return max(n - n % blocksize, blocksize)
    return max(CHUNK_ELEMENTS, blocksize)  # a multiple of blocksize (both are powers of two), hence even


@contextmanager
def one_intra_op_thread():
    """Run the ATen ops inside on the calling thread alone (point 3); yields the caller's thread count.

    torch.set_num_threads(1) for the duration, the caller's count restored after, also on an error. OpenMP
    keeps the count per calling thread, so other threads are not affected.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """torch.isfinite(x).all(), with no parallel region (point 3: a check is a kernel too), in one pass.

    x holds a NaN or an Inf exactly when its smallest or its largest value is one (min and max propagate NaN,
    and +-Inf is an extreme), so one `aminmax` pass suffices, where isfinite(x).all() makes four passes and an
    8-bit temporary (about 13x slower on the absmax of a 4096 x 4096 weight).
    """
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    with one_intra_op_thread():
        return torch.isfinite(torch.stack(torch.aminmax(x))).all()


def workers(count: int) -> ThreadPoolExecutor:
    """`count` threads kept for the process, whose own ATen ops each run on one thread (point 3).

    Keyed by process id too: a forked child has none of its parent's threads and builds its own. The
    initializer's torch.set_num_threads(1) also changes process-wide settings (MKL's, ATen's default for new
    threads); run_steps restores the caller's count after its workers are done, which undoes that.
    """
    return cached(("workers", count, os.getpid()), lambda: ThreadPoolExecutor(
        count, thread_name_prefix="minilora-kernels", initializer=torch.set_num_threads, initargs=(1,)))


def run_steps(total: int, step: int, device: torch.device, work) -> None:
    """Call `work(start, stop)` once for each step [start, stop) covering range(0, total), `step` values each.

    Off the CPU: in order, on the calling thread. On a CPU (point 3): no ATen parallel region anywhere;
    with T = torch.get_num_threads() > 1 and at least 2 steps per thread, the caller and T - 1 `workers`
    each take the next undone step until none is left (so `work` must only write its own step's outputs).
    Returns when every step is done; the first error stops the handing-out of steps and is raised.
    """
    starts = iter(range(0, total, step))
    if device.type != "cpu":
        for start in starts:
            work(start, min(start + step, total))
        return
    lock, failed = threading.Lock(), []

    def take_steps() -> None:
        while True:
            with lock:  # hand out each step once
                start = None if failed else next(starts, None)
            if start is None:
                return
            try:
                work(start, min(start + step, total))
            except BaseException:
                failed.append(True)
                raise

    with one_intra_op_thread() as threads:
        helpers = min(threads, -(-total // step) // 2) - 1
        pending = [workers(helpers).submit(take_steps) for _ in range(helpers)] if helpers > 0 else []
        try:
            take_steps()
        finally:
            for future in pending:  # never return (or raise) while a worker may still write
                future.exception()
        for future in pending:
            future.result()  # a worker's error, raised here


# ----------------------------------------------------------------------------------------------------
# Decode: out[i] = level(q_i) · absmax[i // blocksize]
# ----------------------------------------------------------------------------------------------------


def scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] · scales[i // blocksize] for 1-D `values`: full blocks as one (blocks, blocksize) broadcast,
    a last partial block on its own.

    The same numbers as `values * scales.repeat_interleave(blocksize)[:n]`, in a shape that torch.compile
    gets right: inductor 2.13 on CPU tiles `i // blocksize` into (blocks, blocksize) loops and silently
    never writes a last partial block (tests/test_compile.py catches it).
    """
    n = values.numel()
    full = n - n % blocksize
    head = (values[:full].view(-1, blocksize) * scales[: full // blocksize].unsqueeze(1)).view(-1)
    if full == n:
        return head
    return torch.cat([head, values[full:] * scales[full // blocksize]])



def fused_step_elements(values: int, blocksize: int) -> int:
    """The compiled decode's step: 2 steps per thread where steps of FUSED_MIN_STEP_ELEMENTS allow it, at most
    FUSED_STEP_ELEMENTS values, always whole blocks (the loop works block by block)."""
    per_thread = values // (2 * torch.get_num_threads())
    step = min(FUSED_STEP_ELEMENTS, max(FUSED_MIN_STEP_ELEMENTS, per_thread))
    return max(step - step % blocksize, blocksize)


def decode_full_blocks(flat_bytes, flat_absmax, full: int, blocksize: int, pair_table, out,
                       fused=None) -> None:
    """Decode the first `full` values (a multiple of blocksize) into `out[:full]`.

    pair_table: (256,) int64, entry b = the float32 levels of b's high and low nibble side by side (so one
    gather moves both; see nf4.byte_pair_table). flat_absmax: float32, one per block. out: 1-D, any float
    dtype; the float32 product is rounded once into it. fused: None, or a function (bytes, absmax, out, step)
    that decodes whole blocks in one compiled loop (minilora.native, handed in by nf4), which then does all
    the work, in steps of `fused_step_elements` values on torch's own threads.
    """
    if fused is not None:  # one call: the compiled loop hands its steps to torch's own threads itself
        fused(flat_bytes, flat_absmax, out[:full], fused_step_elements(full, blocksize))
        return

    def work(start: int, stop: int) -> None:
        index = flat_bytes[start // 2: stop // 2].int()  # uint8 -> int32 (index_select takes int32 or int64)
        levels = pair_table.index_select(0, index).view(torch.float32).view(-1, blocksize)
        levels.mul_(flat_absmax[start // blocksize: stop // blocksize].unsqueeze(1))  # float32, in place
        out[start:stop].view(-1, blocksize).copy_(levels)  # rounded once to out's dtype

    run_steps(full, step_elements(out.device, blocksize, full), out.device, work)


# ----------------------------------------------------------------------------------------------------
# Encode: count the midpoints below each scaled value, pack two codes per byte
# ----------------------------------------------------------------------------------------------------


def count_midpoints_below(scaled: torch.Tensor, midpoints: list[float]) -> torch.Tensor:
    """How many of `midpoints` lie strictly below each value: `searchsorted(midpoints, scaled)`, as float32.

    Same answer as the binary search, computed with whole-tensor arithmetic instead: sign(v - m) is +1 when
    v > m, -1 when v < m and 0 on a tie (float32 subtraction is exactly 0 only for equal values). Summed
    over the M midpoints, Σ sign(v - m_j) = below - above = 2·below + ties - M, so

        below = floor((M + Σ_j sign(v - m_j)) / 2)      (a tie adds ½ and is floored away: ties go lower)

    M passes of subtract-and-sign are several times faster on CPU than a per-element binary search.
    `midpoints` is a list of Python floats (exact float32 values), so the loop reads no tensor.
    """
    total = torch.full_like(scaled, float(len(midpoints)))
    diff = torch.empty_like(scaled)
    for m in midpoints:
        torch.sub(scaled, m, out=diff)
        total += diff.sign_()
    return total.mul_(0.5).floor_()


def encode_full_blocks(flat, full: int, blocksize: int, midpoints, pattern_of_position, packed_out,
                       absmax_out) -> None:
    """Quantize the first `full` values of `flat` (a multiple of blocksize) into the preallocated outputs.

    Per block: absmax = max |x|, scaled = x · (1/absmax) (a reciprocal, as bitsandbytes), nearest level by
    `count_midpoints_below`, then byte = q[2k] << 4 | q[2k+1]. pattern_of_position maps sorted position to
    4-bit pattern (uint8, 16) or is None when the code is sorted already (NF4).
    """
    def work(start: int, stop: int) -> None:
        blocks = flat[start:stop].to(torch.float32, copy=True).view(-1, blocksize)  # a copy: scaled in place
        absmax = absmax_out[start // blocksize: stop // blocksize]
        # max |x| as max(max x, -min x): the same number without an |x| copy; abs_() makes a zero block +0.0.
        torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_(), out=absmax).abs_()
        scaled = blocks.mul_((1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).view(-1)
        position = count_midpoints_below(scaled, midpoints).to(torch.uint8)
        q = pattern_of_position[position.long()] if pattern_of_position is not None else position
        torch.bitwise_or(q[0::2] << 4, q[1::2], out=packed_out[start // 2: stop // 2])

    run_steps(full, step_elements(flat.device, blocksize, full), flat.device, work)
