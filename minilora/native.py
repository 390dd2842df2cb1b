"""An optional compiled decode for CPUs with AVX2: the same numbers as the eager kernel, at memory speed.

minilora.kernels decodes in eager PyTorch: per step an index, a gather, a float32 multiply and a rounding
copy, four passes over memory, about three times what a bf16 copy of the output needs (chapter 6, "How fast";
benchmarks/MEASUREMENTS.md). One fused loop closes the gap, with one observation: a block
has only 16 possible outputs, level[c] * absmax for c = 0..15. So, per block of `blocksize` values,

    1. form those 16 products in float32 (two 8-lane multiplies, one IEEE multiply each, exactly as
       `level * absmax`) and round each once to the output dtype: bf16 by round-to-nearest-even on the
       bits, fp16 with F16C's `vcvtps2ph` in round-to-nearest mode;
    2. split the 16 two-byte results into a table of low bytes and a table of high bytes (16 bytes each);
    3. then per 16 packed bytes (32 values): split the nibbles (first value in the high nibble), and look up
       each value's two bytes with `pshufb`, a 16-entry byte table lookup in one instruction, and
       interleave them into the output: about half an instruction per value, no arithmetic at all.

A float32 output has four bytes per entry, so there the loop computes each value instead: per 8 codes
two 8-entry register permutes (`vpermps`, codes 0-7 and 8-15) picked by bit 3 (`vblendvps`), and one
multiply by absmax.

The steps run on torch's own intra-op threads (one `at::parallel_for` region per decode, in which each
thread takes the next undone step until none is left), not on threads of ours: after any parallel op,
torch's OpenMP workers keep spinning for a while on the cores, and a thread of ours beside them got half a
core (benchmarks/MEASUREMENTS.md).

Beside it, for double-quantized weights (chapter 4), `decode_constants` turns the 8-bit constants back into
float32 in one pass, `map[q] * absmax2 + offset` as a multiply and then an add (never a fused multiply-add), and
says whether all are finite: half a dozen small tensor ops, each a Python-level call, became one call.

Every output is one IEEE multiply and one rounding, the same as in the eager kernel, so the result is
equal bit for bit (tests/test_kernels.py and tests/test_core.py compare it with minilora/core/nf4.py's
dequantize_4bit for every dtype, blocksize and length). The values are finite: absmax is checked before
decoding and |level| <= 1. Read first: `fused_decode`.

It is optional and safe. The C++ below is compiled on first use with torch.utils.cpp_extension (g++ with
OpenMP, whose runtime is then torch's own libgomp, already loaded; and ninja), cached by torch in
~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) for later runs; compiling takes 10-60 s once. Without
AVX2, a compiler or ninja, on a compile error (logged once), or with MINILORA_NATIVE=0, `decoder()` is None
and minilora.kernels decodes in eager PyTorch, the path the chapters explain.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

SOURCE = r"""
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <pybind11/pybind11.h>

// 8 codes -> 8 float32 levels * scale. `codes` holds 4 bytes, two codes each, the first in the high nibble.
static inline __m256 levels_times(uint32_t four_bytes, __m256 low8, __m256 high8, __m256 scale) {
  __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128((int)four_bytes));    // b0 b1 b2 b3 in lanes 0-3
  __m256i pairs = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  __m256i shift = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);                   // high nibble first
  __m256i code = _mm256_and_si256(_mm256_srlv_epi32(pairs, shift), _mm256_set1_epi32(15));
  __m256 low = _mm256_permutevar8x32_ps(low8, code);                            // levels of codes 0-7
  __m256 high = _mm256_permutevar8x32_ps(high8, code);                          // levels of codes 8-15
  __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(code, 28));              // bit 3 -> the sign bit
  return _mm256_mul_ps(_mm256_blendv_ps(low, high, pick), scale);
}

// float32 -> bfloat16 bits, round to nearest, ties to even (finite inputs), 8 values -> 8 uint16.
static inline __m128i to_bf16(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// float32 -> 8 uint16: bf16 (kind 1) or fp16 (kind 2), each rounded to nearest even.
static inline __m128i to_16bit(__m256 v, int kind) {
  return kind == 1 ? to_bf16(v) : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// One block's 16 possible outputs (steps 1-2): low_bytes[c], high_bytes[c] = the bytes of round(level[c] * scale).
static inline void block_table(__m256 low8, __m256 high8, float scale, int kind, __m128i& low_bytes,
                               __m128i& high_bytes) {
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);  // low bytes first
  const __m256 s = _mm256_set1_ps(scale);
  __m128i a = _mm_shuffle_epi8(to_16bit(_mm256_mul_ps(low8, s), kind), split);    // codes 0-7
  __m128i b = _mm_shuffle_epi8(to_16bit(_mm256_mul_ps(high8, s), kind), split);   // codes 8-15
  low_bytes = _mm_unpacklo_epi64(a, b);
  high_bytes = _mm_unpackhi_epi64(a, b);
}

// 16 codes -> their 16 two-byte outputs, stored in order at dst (step 3).
static inline void store_lookup(uint16_t* dst, __m128i codes, __m128i low_bytes, __m128i high_bytes) {
  __m128i lo = _mm_shuffle_epi8(low_bytes, codes), hi = _mm_shuffle_epi8(high_bytes, codes);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi8(lo, hi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), _mm_unpackhi_epi8(lo, hi));
}

// kind 1 bfloat16 or 2 float16. `values` is a multiple of `blocksize`, itself a multiple of 32.
static void decode_16bit(const uint8_t* bytes, const float* scales, __m256 low8, __m256 high8, uint16_t* out,
                         int64_t values, int64_t blocksize, int kind) {
  const __m128i nibble = _mm_set1_epi8(15);
  for (int64_t block = 0; block < values / blocksize; ++block) {
    __m128i low_bytes, high_bytes;
    block_table(low8, high8, scales[block], kind, low_bytes, high_bytes);
    for (int64_t i = block * blocksize; i < (block + 1) * blocksize; i += 32) {
      __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + i / 2));   // 32 codes
      __m128i first = _mm_and_si128(_mm_srli_epi16(x, 4), nibble), second = _mm_and_si128(x, nibble);
      store_lookup(out + i, _mm_unpacklo_epi8(first, second), low_bytes, high_bytes);       // values 0-15
      store_lookup(out + i + 16, _mm_unpackhi_epi8(first, second), low_bytes, high_bytes);  // values 16-31
    }
  }
}

// kind: 0 float32, 1 bfloat16, 2 float16. `values` is a multiple of `blocksize`, itself a multiple of 32.
static void decode(const uint8_t* bytes, const float* scales, const float* levels, char* out, int64_t values,
                   int64_t blocksize, int kind) {
  const __m256 low8 = _mm256_loadu_ps(levels), high8 = _mm256_loadu_ps(levels + 8);
  if (kind != 0) {
    decode_16bit(bytes, scales, low8, high8, reinterpret_cast<uint16_t*>(out), values, blocksize, kind);
    return;
  }
  for (int64_t i = 0; i < values; i += 8) {   // float32: 8 values computed at a time
    uint32_t four;
    std::memcpy(&four, bytes + i / 2, 4);
    _mm256_storeu_ps(reinterpret_cast<float*>(out) + i,
                     levels_times(four, low8, high8, _mm256_set1_ps(scales[i / blocksize])));
  }
}

// All `values` in steps of `step` values (a multiple of blocksize), handed out one at a time to torch's own
// intra-op threads: each takes the next undone step until none is left, so a descheduled thread delays only
// the step it holds. At least 2 steps per thread, else one thread (the caller) does them all.
static void decode_steps(uintptr_t packed, uintptr_t absmax, uintptr_t table16, uintptr_t out, int64_t values,
                         int64_t blocksize, int kind, int64_t step) {
  const int64_t steps = (values + step - 1) / step, out_bytes = kind == 0 ? 4 : 2;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), steps / 2));
  std::atomic<int64_t> next{0};
  auto take_steps = [&](int64_t, int64_t) {
    for (int64_t s = next++; s < steps; s = next++) {
      const int64_t start = s * step;
      decode(reinterpret_cast<const uint8_t*>(packed) + start / 2,
             reinterpret_cast<const float*>(absmax) + start / blocksize, reinterpret_cast<const float*>(table16),
             reinterpret_cast<char*>(out) + start * out_bytes, std::min(step, values - start), blocksize, kind);
    }
  };
  if (threads == 1) {
    take_steps(0, 1);
  } else {
    at::parallel_for(0, threads, 1, take_steps);   // one call of take_steps per thread
  }
}

// Double quantization's constants (chapter 4): absmax[j] = map[q[j]] * absmax2[j / blocksize2] + offset, a float32
// multiply, then a float32 add, each rounded as PyTorch rounds them (compiled with -ffp-contract=off: never fused
// into one multiply-add). A weight's 4096 to 704,512 constants: one thread, one pass. Whether all are finite.
static bool decode_constants(uintptr_t codes, uintptr_t map, uintptr_t absmax2, float offset, uintptr_t out,
                             int64_t n, int64_t blocksize2) {
  const uint8_t* q = reinterpret_cast<const uint8_t*>(codes);
  const float* levels = reinterpret_cast<const float*>(map);
  const float* scales = reinterpret_cast<const float*>(absmax2);
  float* absmax = reinterpret_cast<float*>(out);
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) {
    const float scaled = levels[q[j]] * scales[j / blocksize2];
    absmax[j] = scaled + offset;
    finite &= (absmax[j] - absmax[j]) == 0.0f;   // false for NaN and +-Inf alone
  }
  return finite;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_steps", &decode_steps, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("decode_constants", &decode_constants, pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MODULE: list = []   # [] not tried yet; [None] unavailable; [module] compiled


def decoder():
    """The compiled module (its `decode_steps`), compiled and loaded on first call; None where it cannot be."""
    if not _MODULE:
        _MODULE.append(_build())
    return _MODULE[0]


def _build():
    if os.environ.get("MINILORA_NATIVE", "1") == "0":
        return None
    if not _cpu_has_avx2() or shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        return None
    from torch.utils.cpp_extension import load_inline
    try:
        return load_inline(name="minilora_native_decode", cpp_sources=[SOURCE], verbose=False,
                           extra_cflags=["-O3", "-mavx2", "-mf16c", "-fopenmp", "-ffp-contract=off"],
                           extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError, ImportError) as err:   # a compiler error: decode in eager PyTorch instead
        logging.getLogger(__name__).warning("minilora.native: not compiled (%s); the eager decode is used", err)
        return None


def _cpu_has_avx2() -> bool:
    """From the CPU itself (/proc/cpuinfo): ATEN_CPU_CAPABILITY may cap ATen's kernels, not this one's."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "f16c" in flags


def fused_decode(levels: torch.Tensor, blocksize: int, out: torch.Tensor):
    """A function (bytes, absmax, out, step) that decodes whole blocks of `out`'s dtype with the compiled
    loop, or None where it cannot: no compiled module, not a CPU tensor, another dtype, or not contiguous."""
    usable = (out.device.type == "cpu" and out.dtype in KINDS and out.is_contiguous() and blocksize % 32 == 0
              and levels.numel() == 16 and levels.dtype == torch.float32 and levels.device.type == "cpu")
    module = decoder() if usable else None
    if module is None:
        return None
    levels = levels.contiguous()

    def decode(packed: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, step: int) -> None:
        # out[i] = levels[code i] · absmax[i // blocksize], whole blocks, in steps of `step` values on torch's
        # intra-op threads (decode_steps); contiguous tensors, or slices of them
        module.decode_steps(packed.data_ptr(), absmax.data_ptr(), levels.data_ptr(), out.data_ptr(),
                            out.numel(), blocksize, KINDS[out.dtype], step)
    return decode


def decode_constants(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor,
                     blocksize2: int) -> torch.Tensor | None:
    """Double quantization's float32 constants, `levels[qabsmax] * absmax2[j // blocksize2] + offset`, in one
    compiled pass, equal bit for bit to minilora.core.double_quant.double_dequantize; None where there is no
    compiled module or the tensors are not contiguous CPU ones of the expected dtypes. ValueError if a
    constant is not finite (a corrupted checkpoint: never decode into NaN weights)."""
    usable = (qabsmax.device.type == "cpu" and qabsmax.dtype == torch.uint8 and qabsmax.is_contiguous()
              and absmax2.dtype == torch.float32 and absmax2.is_contiguous() and levels.dtype == torch.float32
              and levels.is_contiguous() and levels.numel() == 256
              and absmax2.numel() >= -(-qabsmax.numel() // blocksize2))  # never read past absmax2's end
    module = decoder() if usable else None
    if module is None:
        return None
    out = torch.empty(qabsmax.numel(), dtype=torch.float32)
    if not module.decode_constants(qabsmax.data_ptr(), levels.data_ptr(), absmax2.data_ptr(), float(offset),
                                   out.data_ptr(), out.numel(), blocksize2):
        raise ValueError("absmax: the double-quantized constants decode to NaN or Inf")
    return out
