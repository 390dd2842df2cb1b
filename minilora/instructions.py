"""Instruction data for the training loop: a JSONL file of {"prompt", "response"} pairs becomes token tensors
with the loss on the response only, served as shuffled micro-batches that can restart at any position.

    read_jsonl (errors name the file and the line) → a tokenizer (CharTokenizer for the running example,
    HFTokenizer for a Hugging Face model) → tokenize_records → TokenData → Batches

minilora.train reads its `--data` through these (`load_data`); scripts/qlora_7b.py uses them directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minilora import data as running_example

# ----------------------------------------------------------------------------------------------------
# The JSONL reader
# ----------------------------------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    """[{"prompt": str, "response": str}, ...] from a JSONL file; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data: no such file {str(path)!r} "
                                f"(give 'running-example' or a JSONL file)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno}): "
                                 f"{line.strip()[:80]!r}") from None
            if (not isinstance(record, dict) or not isinstance(record.get("prompt"), str)
                    or not isinstance(record.get("response"), str)):
                raise ValueError(f"{path}:{line_no}: each line must be an object with string fields "
                                 f"'prompt' and 'response', got {line.strip()[:80]!r}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: the file holds no examples")
    return records


# ----------------------------------------------------------------------------------------------------
# Tokenizers: prompt ids and response ids
# ----------------------------------------------------------------------------------------------------


class CharTokenizer:
    """The running example's tokenizer (one token per letter, `<bos>`-style specials), for JSONL files."""

    pad_token_id = running_example.PAD_ID

    def prompt_ids(self, text: str) -> list[int]:
        return running_example.encode(text)

    def response_ids(self, text: str) -> list[int]:
        return running_example.encode(text)


class HFTokenizer:
    """A Hugging Face tokenizer: the prompt gets the model's start tokens, the response ends in EOS."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = 0 if pad is None else pad

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def response_ids(self, text: str) -> list[int]:
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + eos


# ----------------------------------------------------------------------------------------------------
# Token tensors and shuffled micro-batches
# ----------------------------------------------------------------------------------------------------


def tokenize_records(records: list[dict], tokenizer, max_seq_len: int, source: str) -> TokenData:
    """Prompt + response token ids, labels -100 on the prompt (the loss is on the response only)."""
    rows, label_rows = [], []
    for i, record in enumerate(records):
        try:
            prompt = tokenizer.prompt_ids(record["prompt"])
            response = tokenizer.response_ids(record["response"])
        except ValueError as err:
            raise ValueError(f"{source}: example {i + 1}: {err}") from None
        ids = (prompt + response)[:max_seq_len]
        labels = ([-100] * len(prompt) + response)[:max_seq_len]
        if all(label == -100 for label in labels):
            raise ValueError(f"{source}: example {i + 1}: no response token left within --max-seq-len="
                             f"{max_seq_len} (prompt has {len(prompt)} tokens)")
        rows.append(ids)
        label_rows.append(labels)
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention_mask[i, :len(ids)] = 1
    return TokenData(input_ids, labels, attention_mask)


@dataclass
class TokenData:
    """n examples, right-padded to a common length: input_ids, labels (-100 = not scored), attention_mask.

    Right padding is harmless for a causal LM: a pad token sits after every real token, so no real token
    attends to it, and its label is -100, so it adds nothing to the loss.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at `index`, trimmed to the longest one among them."""
        mask = self.attention_mask[index]
        length = int(mask.sum(dim=1).max())
        return {"input_ids": self.input_ids[index, :length], "labels": self.labels[index, :length],
                "attention_mask": mask[:, :length]}



class Batches:
    """Micro-batches in shuffled epochs. `position` (micro-batches served so far) is the loader's whole state:
    epoch e's order is randperm(n) drawn from a generator seeded with seed + e, so any position can be
    restarted exactly."""

    def __init__(self, data: TokenData, batch_size: int, seed: int, position: int = 0):
        if batch_size > len(data):
            raise ValueError(f"--batch-size={batch_size} is larger than the {len(data)} training examples")
        self.data, self.batch_size, self.seed, self.position = data, batch_size, seed, position
        self.per_epoch = len(data) // batch_size  # a last partial batch is dropped
        self._epoch, self._order = None, None

    def next(self) -> dict[str, torch.Tensor]:
        epoch, k = divmod(self.position, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.data), generator=generator)
        self.position += 1
        return self.data.batch(self._order[k * self.batch_size:(k + 1) * self.batch_size])
