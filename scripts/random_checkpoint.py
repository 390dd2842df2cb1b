"""Write a checkpoint folder of a preset architecture with random weights, one shard at a time.

    python scripts/random_checkpoint.py llama-7b /tmp/llama-7b-random              # 13.5 GB of bf16 on disk
    python scripts/random_checkpoint.py llama-7b /tmp/llama-7b-2 --layers 2        # 7B widths, 2 layers: 1.3 GB

A real 7B checkpoint cannot be downloaded here, so the book's 7B runs from a folder (chapter 7) read one written
by this script. The folder is laid out as transformers' `save_pretrained` lays it out: config.json, the shards
model-0000k-of-0000n.safetensors (or model.safetensors when one shard holds everything) and
model.safetensors.index.json. Memory holds one shard at a time (at most --shard-gb, or the largest tensor),
never the model. Each shard is written to a temporary name and renamed, so a crash leaves no half-written file.

The weights are those minilora.model_builder.random_weights draws for the same seed and dtype, so reading the
folder in its own dtype gives the model `--random-init` builds. Beside them goes a tokenizer (tokenizer.json)
that reads text as UTF-8 bytes with Llama's byte-fallback ids, the ids minilora.instructions.ByteTokenizer gives
a preset: `python -m minilora.train --model <folder> --data x.jsonl` and `--model <preset> --random-init
--compute-dtype <dtype> --data x.jsonl` train the same model on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from minilora.architecture import PRESETS  # noqa: E402
from minilora.checkpoint_files import INDEX_FILE, SINGLE_FILE  # noqa: E402
from minilora.files import write_atomically  # noqa: E402
from minilora.instructions import ByteTokenizer  # noqa: E402
from minilora.model_builder import plan_random, preset_config, tensor_names  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shard_names(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """The tensors, in order, cut into groups of at most `shard_bytes` (a larger tensor gets a group alone)."""
    shards, current, held = [], [], 0
    for name, size in sizes.items():
        if current and held + size > shard_bytes:
            shards.append(current)
            current, held = [], 0
        current.append(name)
        held += size
    return shards + [current] if current else shards


def write_checkpoint(config, folder, dtype: torch.dtype, seed: int = 0, shard_bytes: int = 2 * 10**9) -> int:
    """Write `config`'s model with random weights into `folder` (created; must not hold a checkpoint yet),
    shard by shard. Returns the bytes of weights written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if (folder / INDEX_FILE).exists() or (folder / SINGLE_FILE).exists():
        raise ValueError(f"{folder} holds a checkpoint already; give a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    plan = plan_random(config, dtype, seed)
    needed, _ = tensor_names(plan.skeleton)
    item = torch.finfo(dtype).bits // 8
    sizes = {name: item * torch.Size(shape).numel() for name, shape in needed.items()}
    shards = shard_names(sizes, shard_bytes)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_atomically(folder / file, lambda tmp, names=names: save_file(
            plan.weights(names, dtype, torch.device("cpu")), tmp, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        write_atomically(folder / INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
    write_byte_tokenizer(folder)
    config.save_pretrained(folder)  # config.json, last: a folder without it is not a model folder
    return sum(sizes.values())


def write_byte_tokenizer(folder) -> None:
    """tokenizer.json + tokenizer_config.json of a byte-level tokenizer: a BPE with no merges whose only tokens
    are <unk>, <s>, </s> and Llama's 256 byte tokens <0x00>..<0xFF> (ids 3..258), so every character falls back
    to its UTF-8 bytes; <s> starts every encoded text, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    ids = ByteTokenizer  # the same ids as minilora's ByteTokenizer, which --random-init runs use
    vocab = {"<unk>": ids.pad_token_id, "<s>": ids.bos_token_id, "</s>": ids.eos_token_id,
             **{f"<0x{b:02X}>": ids.first_byte_id + b for b in range(256)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", ids.bos_token_id)])
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("folder", help="the new checkpoint folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the dtype stored in the files")
    p.add_argument("--layers", type=int, help="keep only this many decoder layers (the preset's widths)")
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest shard, in GB (10^9 bytes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    started = time.perf_counter()
    try:
        written = write_checkpoint(preset_config(args.preset, **overrides), args.folder, DTYPES[args.dtype],
                                   args.seed, int(args.shard_gb * 1e9))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written / 1e9:.2f} GB of {args.dtype} weights to {args.folder} in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
