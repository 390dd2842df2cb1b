"""minilora — LoRA, AdaLoRA and QLoRA built from scratch, one readable module per idea.

Each chapter's idea is one file in minilora/core/ (read it first: lora, adalora, nf4, double_quant, paged, qlora,
memory), importing only torch; the modules below build the real package on it. The package is a house with
floors; each module imports only from the floors below it, and the core is below them all:

    core      lora, adalora, nf4, double_quant, paged, qlora, memory: one chapter each (minilora/core/__init__.py)
    floor 0   files       atomic file writes (temporary name, then rename)
              machine     where a number was measured (CPU capability, threads, versions); quiet log lines
              checks      the shared checks of public arguments (an integer, a number in a range, a choice)
              codes       the 4-bit types by name, checked (their levels are core.nf4's)      (chapter 3)
              kernels     the fast 4-bit encode/decode of core.nf4's steps; cached tables   (chapter 3)
              native      the optional compiled AVX2 decode (C++ compiled on first use), bit-exact (chapter 6)
              frozen_linear  a frozen base's matmul; its input gradient in the layout fast here (chapter 6)
              targets     peft's rules for which modules get an adapter, and with which rank (chapter 1)
              page_pool   the paged optimizer's counters (its LRU pool is core.paged's)  (chapter 5)
              adapter_files  peft's adapter folder: file names, plain settings, strict reading
              peft_layer  peft's options for where an adapter lives, and its layer-level names (chapter 1)
              checkpoint_files  a checkpoint folder's safetensors: headers checked, one tensor read at a time
    floor 1   bypass      what the package's bypass layers add to the core's; merging     (chapter 1)
              nf4         core.nf4's quantize/dequantize, checked and in fast kernels     (chapter 3)
              architecture a Llama's shapes and exact parameter counts                    (chapter 7)
              measure     bytes measured on a real model; what the process holds (CPU peaks) (chapter 7)
              loop        the one training step, sampler, evaluator and data class         (chapter 6)
              lora_config LoraConfig: which layers, which rank, what else trains (peft's options)
    floor 2   lora        the LoRA bypass h = W0 x + (α/r) B A x, several adapters, add_lora (chapter 1)
              svd_adapter AdaLoRA's layer P Λ Q, its config, the orthogonality penalty     (chapter 2)
              paged       a paged AdamW: optimizer state in pages, write-back, prefetch     (chapter 5)
              double_quant   quantizing the quantization constants                       (chapter 4)
              activations the bytes autograd saves for backward, tensor by tensor          (chapter 7)
              data        the running example: a tiny Llama and a new skill to teach it
              options     every option of a training run, its default, help and check; recipes
              model_builder  the one way to build a model: skeleton on meta, then layer by layer (ch. 7)
    floor 3   adalora     importance scores, the budget schedule, RankAllocator            (chapter 2)
              family      LoRA's family: rsLoRA, DoRA, PiSSA, LoRA+                        (chapter 1)
              switching   several adapters on one model: set, disable, delete, combine     (chapter 1)
              adalora_files  AdaLoRA adapters in peft's files                              (chapter 2)
              memory      the memory model of a fine-tuning run                             (chapter 7)
              qlora       Linear4bit (NF4 storage, bf16 compute), quantize_model           (chapter 6)
              instructions  JSONL instruction data → token tensors
              distributed the loop under torchrun: DDP, FSDP over the adapter only           (chapter 7)
    floor 4   adapters    adapter files in peft's format: every LoRA option, DoRA; AdaLoRA's dispatched
              build       the pieces of a run from its options: model, method, data, optimizer, schedule
              plots       the charts the chapters share
              experiments the chapters' experiments: data types (ch. 6), forgetting (ch. 9)
    floor 5   checkpoints the run folder, checkpoints, metrics file and loss plot
    floor 6   train       a training run and its command line                              (chapter 6)
    floor 7   __main__    `python -m minilora demo`, the guided tour

Everything a reader needs most is importable from here: `from minilora import add_lora, LoraConfig`.
Each module has more (helpers, the readable reference kernels); import those from the module itself.
"""

from minilora.adalora import AdaLoraConfig, RankAllocator, SVDLinear, add_adalora, orthogonal_penalty
from minilora.adapters import load_adapter, save_adapter
from minilora.data import VOCAB, build_tiny_llama, finetune, make_task, pretrained_tiny_llama, tiny_llama_config
from minilora.double_quant import QuantizedWeight, double_dequantize, double_quantize, dynamic_map
from minilora.loop import TokenData, evaluate, train_step
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
from minilora.switching import add_weighted_adapter, delete_adapter, disable_adapter, set_adapter

__version__ = "0.1.0"

# No module above imports bitsandbytes or peft at import time, so this runs before either can log.
quiet_known_log_lines()

__all__ = [
    # chapter 1: LoRA
    "LoRALinear", "LoraConfig", "add_lora", "merge_lora", "trainable_summary",
    "find_target_modules", "replace_module", "mark_only_lora_trainable",
    "save_adapter", "load_adapter",
    "set_adapter", "disable_adapter", "delete_adapter", "add_weighted_adapter",
    # the running example
    "VOCAB", "TokenData", "make_task", "tiny_llama_config", "build_tiny_llama", "pretrained_tiny_llama",
    "evaluate", "finetune", "train_step",
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
