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


# --- The PEFT family, LoRA variants and bitsandbytes' rules (Chapter 8, Q6, Q10, Q21, Q22) ---------------------

def rslora_scaling(lora_alpha: float, r: int) -> float:
    """The factor rsLoRA multiplies B·A·x by (Chapter 8, Q6): the rank-stabilized replacement of alpha / r."""
    raise NotImplementedError("hint: the square root of the rank replaces the rank. Check: alpha 16, r 64 -> 2.0.")


def prompt_tuning_parameter_count(num_virtual_tokens: int, hidden_size: int) -> int:
    """Trainable parameters of prompt tuning: learned input embeddings ("soft tokens") prepended to the input."""
    raise NotImplementedError("hint: one embedding vector per virtual token. Check: 20 tokens at 4096 -> 81,920.")


def prefix_tuning_parameter_count(num_virtual_tokens: int, num_layers: int, hidden_size: int) -> int:
    """Trainable parameters of prefix tuning without reparametrization, for a model without grouped-query
    attention: learned key and value vectors for every virtual token in every layer."""
    raise NotImplementedError("hint: a key AND a value per token per layer. Check: 20 tokens, 32 layers, 4096 -> "
                              "5,242,880.")


def ia3_parameter_count(num_layers: int, kv_dim: int, intermediate_size: int) -> int:
    """Trainable parameters of IA3 on a Llama-style model as peft places it by default: one learned vector
    rescaling k_proj's output, one rescaling v_proj's output and one rescaling down_proj's input, per layer."""
    raise NotImplementedError("hint: each vector has the length of the activation it rescales. Check: LLaMA-7B "
                              "(32 layers, kv 4096, MLP 11008) -> 614,400.")


def is_paged_by_bitsandbytes(numel: int) -> bool:
    """Does a bitsandbytes paged optimizer put the state of a parameter with `numel` elements in paged
    (CUDA unified) memory? (Chapter 8, Q21)"""
    raise NotImplementedError("hint: only large tensors are paged; the threshold is 10**5 elements. Check: a LoRA "
                              "A of 8 x 4096 is not paged.")


def adam_8bit_state_bytes(num_params: int) -> int:
    """Bytes bitsandbytes' 8-bit AdamW keeps for one parameter tensor of `num_params` >= 4096 elements: both
    moments as 8-bit codes, each with one fp32 absmax per block of 256 values (the code tables not counted)."""
    raise NotImplementedError("hint: 1 byte per value per moment, plus 4 bytes per block per moment; a partial "
                              "last block still has its absmax. Check: 10**6 values -> 2,031,256.")
