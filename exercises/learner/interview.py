"""Exercise 8: the interview self-test (Chapter 8, chapters/08-interview.md).

Each function is one number an interviewer may ask you to work out on a whiteboard. Write the closed-form
answer (a line or two each), then run

    .venv/bin/python -m pytest exercises/test_08_interview.py            # against this file

until everything passes. The tests compare your answers with what minilora computes (a LoRALinear's real
parameters, the memory model, bytes stored by QuantizedWeight, torch's AdamW state, FLOPs counted by torch).
The book's answers are in exercises/solutions/interview.py; try without them first.
Stuck? Longer hints are in exercises/ANSWERS.md.

Units: GB = 10**9 bytes. "bits" and "bytes" are per parameter where the name says so.
"""


def lora_parameter_count(d: int, k: int, r: int) -> int:
    """Trainable parameters LoRA adds to one d x k weight (d = out_features, k = in_features) at rank r."""
    raise NotImplementedError(
        "hint: A is r x k, B is d x r. Check: d = k = 4096, r = 8 gives 65,536.")


def lora_fraction(d: int, k: int, r: int) -> float:
    """LoRA's parameters as a fraction of a full update of the same d x k weight (0.0039 means 0.39 %)."""
    raise NotImplementedError(
        "hint: divide the adapter's parameter count by the d·k numbers of a full update.")


def bits_per_param(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> float:
    """Storage of a blockwise 4-bit weight per parameter, in bits, in the limit of a large tensor."""
    raise NotImplementedError(
        "hint: 4 bits of code plus each weight's share of its block's constants. Check: 4.5 without DQ, "
        "4.127 with, at blocksize 64.")


def dq_saving_bits(blocksize: int = 64, dq_blocksize: int = 256) -> float:
    """Bits per parameter that double quantization saves (it is not 0.5)."""
    raise NotImplementedError(
        "hint: the difference between bits_per_param without and with double quantization.")


def weight_gb(num_params: int, bits: float) -> float:
    """GB (10**9 bytes) to store `num_params` weights at `bits` bits each."""
    raise NotImplementedError(
        "hint: bits -> bytes is a division by 8; GB is 10**9 bytes. Check: 65B parameters in bf16 ≈ 130 GB.")


def adam_state_bytes_per_param(master_weights: bool = False) -> int:
    """Bytes Adam keeps per trained parameter with fp32 moments; master_weights adds the fp32 copy of the
    weights that mixed-precision training updates."""
    raise NotImplementedError(
        "hint: two moments (m and v), 4 bytes each in fp32; a master copy is one more fp32 number.")


def full_finetune_gb(num_params: int, master_weights: bool = True) -> float:
    """GB for weights + gradients + optimizer state of mixed-precision full fine-tuning with Adam (bf16
    weights and gradients, fp32 moments, optionally an fp32 master copy); activations not included."""
    raise NotImplementedError(
        "hint: weight + gradient + optimizer state, per parameter. Check: 16 bytes with a master copy, "
        "12 without.")


def training_flops_per_token(num_params: int, method: str = "full") -> int:
    """Matmul FLOPs per trained token for a model of `num_params` weights, without gradient checkpointing:
    method "full" trains every weight, "lora" (or "qlora") keeps them frozen (ignore the small adapters)."""
    raise NotImplementedError(
        "hint: count forward, input-gradient and weight-gradient matmuls; which one does a frozen weight "
        "skip?")
