#!/usr/bin/env bash
# One prepared check for a single NVIDIA GPU with no internet (torch, transformers, bitsandbytes, peft installed),
# under 8 minutes:
#
#   1. correctness: minilora's NF4 bytes, double-quantized constants and Linear4bit outputs/input gradients
#      against bitsandbytes' CUDA kernels, and dequantize 4096², 11008×4096 → bf16 timed beside bitsandbytes'
#      CUDA kernel and a bf16 copy (scripts/bnb_check.py)
#   2. speed and memory: the QLoRA 7B recipe on a random-init llama-7b, minilora beside transformers +
#      bitsandbytes + peft, at seq 512 and 2048 (scripts/qlora_7b.py --stack both)
#
# Both run in ONE Python process (imports are paid once). Results go to OUT_DIR:
#   correctness.md, bench.json (written after every measurement), bench.md, summary.md (both tables).
#
# usage: scripts/gpu_check.sh [--dry-run] [OUT_DIR]        (default OUT_DIR: gpu_check_results)
#        MINILORA_DRY_RUN=1 scripts/gpu_check.sh OUT_DIR     the same as --dry-run
#   --dry-run: CPU, the book's tiny model, small shapes, one step: the same code path in seconds (tests use it).
#   PYTHON=...  the interpreter (default: .venv/bin/python if present, else python3)
#   GPU_CHECK_STEPS / GPU_CHECK_ACCUM: timed optimizer steps (default 2) and micro-batches per step (default 4;
#   the recipe's 16 only multiplies the time per step, tokens/s and peak memory do not change with it).
set -euo pipefail

DRY_RUN="${MINILORA_DRY_RUN:-0}"
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (allowed: --dry-run)" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
OUT="${OUT:-gpu_check_results}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if [[ "$DRY_RUN" == "1" ]]; then
  CHECK_ARGS=(--dry-run --out "$OUT")
  BENCH_ARGS=(--dry-run --stack both --json "$OUT/bench.json" --markdown "$OUT/bench.md")
else
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to $PYTHON (use --dry-run on a CPU machine)" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
  CHECK_ARGS=(--device cuda --out "$OUT")
  BENCH_ARGS=(--config llama-7b --random-init --seq-len 512 2048 --stack both
              --steps "${GPU_CHECK_STEPS:-2}" --warmup 1 --grad-accum "${GPU_CHECK_ACCUM:-4}" --samples 32
              --json "$OUT/bench.json" --markdown "$OUT/bench.md")
fi

cd "$ROOT"
set +e
PYTHONUNBUFFERED=1 "$PYTHON" - "$OUT" "${#CHECK_ARGS[@]}" "${CHECK_ARGS[@]}" "${BENCH_ARGS[@]}" <<'PY' 2>&1 | tee "$OUT/log.txt"
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, "scripts")
import bnb_check  # noqa: E402
import qlora_7b  # noqa: E402

out, n_check = sys.argv[1], int(sys.argv[2])
check_args, bench_args = sys.argv[3:3 + n_check], sys.argv[3 + n_check:]
print("== 1. correctness: minilora vs bitsandbytes ==", flush=True)
check_rc = bnb_check.main(check_args)
print("== 2. QLoRA step benchmark: minilora vs transformers + bitsandbytes + peft ==", flush=True)
bench_rc = qlora_7b.main(bench_args)
sys.exit(1 if check_rc else bench_rc)
PY
RC=${PIPESTATUS[0]}
set -e

{
  echo "# gpu_check ($( [[ "$DRY_RUN" == "1" ]] && echo "dry run, CPU, tiny model" || cat "$OUT/gpu.txt" 2>/dev/null ))"
  echo
  cat "$OUT/correctness.md" 2>/dev/null || echo "(no correctness table: see log.txt)"
  echo
  echo "QLoRA step benchmark (random-init weights, synthetic data, batch 1):"
  echo
  cat "$OUT/bench.md" 2>/dev/null || echo "(no benchmark table: see log.txt)"
} > "$OUT/summary.md"
echo "gpu_check.sh: exit $RC; tables in $OUT/summary.md"
exit "$RC"
