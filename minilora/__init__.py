"""minilora — LoRA, AdaLoRA and QLoRA built from scratch, one readable module per idea.

The package is a house with floors; each module imports only from the floors below it:

    floor 0   files       atomic file writes (temporary name, then rename)
              machine     where a number was measured (CPU capability, threads, versions); quiet log lines
              kernels     the fast 4-bit encode/decode beside nf4's references; cached tables (chapter 3)
    floor 1   lora        the LoRA bypass h = W0 x + (α/r) B A x, injection, merging       (chapter 1)
              nf4         NF4 / FP4 / Int4 codes, blockwise absmax quantization, packing   (chapter 3)
              paged       a paged AdamW: optimizer state in pages, LRU pool, write-back    (chapter 5)
              memory      the memory model of a fine-tuning run                             (chapter 7)
              data        the running example: a tiny Llama and a new skill to teach it
              checkpoints what a run writes: checkpoint pieces, the metrics file, the loss plot
    floor 2   adalora     SVD-form updates P Λ Q, importance scores, the budget schedule   (chapter 2)
              double_quant   quantizing the quantization constants                       (chapter 4)
              plots       the charts the chapters share
              instructions  JSONL instruction data → tokens → shuffled micro-batches
    floor 3   qlora       Linear4bit (NF4 storage, bf16 compute), quantize_model           (chapter 6)
              adapters    adapter files in peft's format, for LoRA and AdaLoRA
              distributed the loop under torchrun: DDP, FSDP over the adapter only           (chapter 7)
    floor 4   train       the training loop and its command line                           (chapter 6)
    floor 5   __main__    `python -m minilora demo`, the guided tour

Everything a reader needs most is importable from here: `from minilora import add_lora, LoraConfig`.
Each module has more (helpers, the readable reference kernels); import those from the module itself.
"""

from minilora.adalora import AdaLoraConfig, RankAllocator, SVDLinear, add_adalora, orthogonal_penalty
from minilora.adapters import load_adapter, save_adapter
from minilora.data import (
    VOCAB,
    TaskData,
    build_tiny_llama,
    evaluate,
    finetune,
    make_task,
    pretrained_tiny_llama,
    tiny_llama_config,
)
from minilora.double_quant import QuantizedWeight, double_dequantize, double_quantize, dynamic_map
from minilora.lora import (
    LoraConfig,
    LoRALinear,
    add_lora,
    find_target_modules,
    mark_only_lora_trainable,
    merge_lora,
    replace_module,
    trainable_summary,
)
from minilora.machine import quiet_known_log_lines
from minilora.memory import MemoryReport, estimate
from minilora.nf4 import dequantize_4bit, fp4_code, int4_code, nf4_code, pack_4bit, quantize_4bit, unpack_4bit
from minilora.paged import PagedAdamW
from minilora.qlora import Linear4bit, prepare_for_kbit_training, quantize_model

__version__ = "0.1.0"

# No module above imports bitsandbytes or peft at import time, so this runs before either can log.
quiet_known_log_lines()

__all__ = [
    # chapter 1: LoRA
    "LoRALinear", "LoraConfig", "add_lora", "merge_lora", "trainable_summary",
    "find_target_modules", "replace_module", "mark_only_lora_trainable",
    "save_adapter", "load_adapter",
    # the running example
    "VOCAB", "TaskData", "make_task", "tiny_llama_config", "build_tiny_llama", "pretrained_tiny_llama",
    "evaluate", "finetune",
    # chapter 2: AdaLoRA
    "SVDLinear", "AdaLoraConfig", "RankAllocator", "add_adalora", "orthogonal_penalty",
    # chapters 3-4: NF4 and double quantization
    "nf4_code", "fp4_code", "int4_code", "quantize_4bit", "dequantize_4bit", "pack_4bit", "unpack_4bit",
    "dynamic_map", "double_quantize", "double_dequantize", "QuantizedWeight",
    # chapter 5: paged AdamW
    "PagedAdamW",
    # chapter 6: QLoRA
    "Linear4bit", "quantize_model", "prepare_for_kbit_training",
    # chapter 7: the memory model
    "estimate", "MemoryReport",
]
