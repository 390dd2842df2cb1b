"""The book's running example: a tiny Llama, a toy "pretraining" language, and a new skill to teach it.

Every chapter adapts the same model to the same task, so that LoRA, AdaLoRA and QLoRA can be compared on
one footing. Real fine-tuning starts from a model that already knows a language and teaches it something
it cannot yet do. We rebuild that situation in miniature, small enough to run on a laptop CPU in seconds:

    pretraining ("pretrain"):  copy a random string        <bos> d a n k o c f i <sep> d a n k o c f i <eos>
    fine-tuning ("finetune"):  copy it through a cipher    <bos> d a n k o c f i <sep> e b o l p d g j <eos>

The fine-tuning answer is the copy with every letter moved one place on in the alphabet (a→b, …, p→a): a
Caesar cipher. The pretrained model already has the hard part, the attention that finds the letter to copy,
and lacks only the letter map. So it starts near 0 % on the new task, and a small change of its weights
(exactly what LoRA offers) is enough to learn it.

Reading order: the vocabulary and `encode`/`decode`; the tasks (`make_task`, which returns the book's one data
class, `minilora.loop.TokenData`); the model (`tiny_llama_config`, `build_tiny_llama`); `finetune`, a loop
of `minilora.loop.train_step` (`evaluate` is `minilora.loop.evaluate`); and finally `pretrained_tiny_llama`,
which pretrains once with `finetune` itself and caches the weights on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minilora.checks import check_choice, check_int, check_number
from minilora.files import write_atomically
from minilora.loop import Batches, Progress, TokenData, evaluate, train_step

# -- vocabulary ------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<bos>", "<sep>", "<eos>"]
LETTERS = list("abcdefghijklmnop")
VOCAB = SPECIAL_TOKENS + LETTERS
PAD_ID, BOS_ID, SEP_ID, EOS_ID = range(4)
FIRST_LETTER_ID = len(SPECIAL_TOKENS)

SEQ_LEN = 8                          # letters in each string
PROMPT_LEN = 1 + SEQ_LEN + 1         # <bos> x_1 … x_8 <sep>
RESPONSE_LEN = SEQ_LEN + 1           # y_1 … y_8 <eos>
TASKS = ("pretrain", "finetune")

_TOKEN_PATTERN = re.compile(r"<[a-z]+>|\S")


def encode(text: str) -> list[int]:
    """Text → token ids. Special tokens are written like `<bos>`, letters one character each; spaces are
    ignored."""
    ids = []
    for token in _TOKEN_PATTERN.findall(text):
        if token not in VOCAB:
            raise ValueError(f"encode: unknown token {token!r} in text={text!r}; allowed tokens are {VOCAB}")
        ids.append(VOCAB.index(token))
    return ids


def decode(ids) -> str:
    """Token ids (list or 1-d tensor) → text, e.g. "<bos>abc<sep>bcd<eos>". Padding is dropped."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    for i in ids:
        if not 0 <= i < len(VOCAB):
            raise ValueError(f"decode: token id {i} is outside the vocabulary (0 … {len(VOCAB) - 1})")
    return "".join(VOCAB[i] for i in ids if i != PAD_ID)


# -- tasks -----------------------------------------------------------------------------------------------


def cipher(letters: torch.Tensor) -> torch.Tensor:
    """The new skill: move every letter one place on in the alphabet, wrapping around (a→b, …, p→a)."""
    return (letters - FIRST_LETTER_ID + 1) % len(LETTERS) + FIRST_LETTER_ID


def make_task(task: str, n: int, seed: int) -> TokenData:
    """n random examples of `task` ("pretrain": copy the string, "finetune": copy it through `cipher`).

    Every example has length L = PROMPT_LEN + RESPONSE_LEN = 19: `input_ids` (n, L) holds prompt and
    response; `labels` (n, L) is the same with every prompt position set to -100, the index PyTorch's
    cross-entropy ignores, so the loss only counts the response tokens. `decode(data.input_ids[i])` shows
    example i as text: "<bos>dankocfi<sep>ebolpdgj<eos>".

    The same (task, n, seed) always gives the same tensors; different seeds give independent examples (with
    16^8 ≈ 4.3e9 possible strings, a train and an eval set practically never share one).
    """
    check_choice("task", task, TASKS)
    check_int("n", n, 1)
    check_int("seed", seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(FIRST_LETTER_ID, len(VOCAB), (n, SEQ_LEN), generator=generator)
    y = x if task == "pretrain" else cipher(x)

    def column(token_id):
        return torch.full((n, 1), token_id, dtype=torch.long)

    input_ids = torch.cat([column(BOS_ID), x, column(SEP_ID), y, column(EOS_ID)], dim=1)
    labels = input_ids.clone()
    labels[:, :PROMPT_LEN] = -100
    return TokenData(input_ids, labels)


# -- the model -------------------------------------------------------------------------------------------


def tiny_llama_config(**overrides):
    """A Llama with the module names of the real thing (q_proj … down_proj, lm_head), shrunk to 76,608
    parameters (a transformers LlamaConfig). Keyword overrides go straight to LlamaConfig."""
    from transformers import LlamaConfig  # here, not at the top: `--help` and the floors below need no model

    settings = dict(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised tiny Llama; the same seed gives the same weights (global RNG left untouched)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(**overrides))


# -- training --------------------------------------------------------------------------------------------


def finetune(model, train_data: TokenData, steps: int, lr: float | None, batch_size: int = 32, seed: int = 0,
             optimizer=None, after_step=None, eval_data: TokenData | None = None,
             eval_every: int | None = None, progress: bool = False, extra_loss=None) -> dict:
    """Train the parameters that have requires_grad on `train_data` for `steps` steps; returns the history.

    Each step is `minilora.loop.train_step`, the loop of the whole book: forward → loss on the response
    tokens (+ `extra_loss(model)` if given, e.g. AdaLoRA's orthogonality penalty) → backward →
    optimizer.step() → `after_step(step)` → zero_grad(). `step` counts from 0, and `after_step` sees the
    gradients (AdaLoRA's allocator needs them). The default optimizer is AdamW(lr, weight_decay=0) over the
    trainable parameters; pass `optimizer` to use another (lr is then unused). With `eval_data`, the model is
    evaluated before training, every `eval_every` steps and at the end. Batches come from shuffled epochs
    (`minilora.loop.Batches`), so the run is deterministic given `seed`.

    Returns {"loss": [training loss of each step], "eval": [(steps done, eval loss, eval accuracy), ...]}.
    """
    check_int("steps", steps, 1)
    if eval_every is not None:
        check_int("eval_every", eval_every, 1)
        if eval_data is None:
            raise ValueError(f"eval_every={eval_every!r} needs eval_data")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no parameter with requires_grad=True; nothing to train")
    if optimizer is None:
        check_number("lr", lr, 0, low_open=True, why=" when no optimizer is given")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = Batches(train_data, batch_size, seed=seed)
    history = {"loss": [], "eval": []}

    def record_eval(steps_done):
        result = evaluate(model, eval_data)
        history["eval"].append((steps_done, result["loss"], result["accuracy"]))

    if eval_data is not None:
        record_eval(0)
    bar = Progress(steps, desc="finetune", enabled=progress)
    model.train()
    for step in range(steps):
        result = train_step(model, batches, optimizer, step, extra_loss=extra_loss, after_step=after_step)
        history["loss"].append(result["loss"])
        bar.update(loss=result["loss"])
        if eval_data is not None and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
            record_eval(step + 1)
    bar.close()
    return history


# -- the pretrained model, cached on disk ----------------------------------------------------------------

# Everything that decides the pretrained weights. Change any of it and the cache key changes with it.
PRETRAIN = dict(model_seed=0, data_seed=0, steps=300, batch_size=64, lr=3e-3)


def cache_key(config=None, pretrain: dict | None = None) -> str:
    """A short hash of the model config, the pretraining settings and the task definition."""
    config = tiny_llama_config() if config is None else config
    settings = config.to_dict()
    settings.pop("transformers_version", None)
    content = dict(config=settings, pretrain=PRETRAIN if pretrain is None else pretrain, vocab=VOCAB,
                   seq_len=SEQ_LEN, task="copy")
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """$MINILORA_CACHE if set, else .cache/minilora/ in the repository root."""
    if os.environ.get("MINILORA_CACHE"):
        return Path(os.environ["MINILORA_CACHE"])
    return Path(__file__).resolve().parent.parent / ".cache" / "minilora"


def pretrained_tiny_llama(cache_dir=None, progress: bool = False):
    """The tiny Llama after pretraining on the copy task (100 % exact match on it, ~0 % on "finetune").

    The first call trains it (300 steps, well under a minute on a CPU) with `finetune` and writes
    tiny-llama-<key>.safetensors and tiny-llama-<key>.json to `cache_dir` (default: `default_cache_dir()`);
    later calls load those files. Every call returns a fresh model in eval mode, so callers may change it.
    """
    config = tiny_llama_config()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(config)
    weights_path = cache_dir / f"tiny-llama-{key}.safetensors"
    config_path = cache_dir / f"tiny-llama-{key}.json"

    model = build_tiny_llama(seed=PRETRAIN["model_seed"])
    if weights_path.exists():
        model.load_state_dict(load_file(weights_path))
        return model.eval()

    data = make_task("pretrain", PRETRAIN["steps"] * PRETRAIN["batch_size"], seed=PRETRAIN["data_seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # 64-wide matrices gain nothing from threads, and a busy machine makes them slow
    try:
        finetune(model, data, steps=PRETRAIN["steps"], lr=PRETRAIN["lr"], batch_size=PRETRAIN["batch_size"],
                 seed=PRETRAIN["data_seed"], progress=progress)
    finally:
        torch.set_num_threads(threads)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    write_atomically(config_path, lambda tmp: Path(tmp).write_text(config.to_json_string()))
    write_atomically(weights_path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return model.eval()
