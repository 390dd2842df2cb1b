"""Instruction data for the training loop: a JSONL file of {"prompt", "response"} pairs becomes token tensors
with the loss on the response only, served as shuffled micro-batches that can restart at any position.

    read_jsonl (errors name the file and the line) → a tokenizer (CharTokenizer for the running example,
    HFTokenizer for a Hugging Face model, ByteTokenizer for a preset with random weights) → tokenize_records
    → minilora.loop.TokenData (→ loop.Batches)

minilora.build reads `--data` and `--eval-data` through these (`load_data`), and so does scripts/qlora_7b.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minilora import data as running_example
from minilora.files import parse_json
from minilora.loop import TokenData

# ----------------------------------------------------------------------------------------------------
# The JSONL reader
# ----------------------------------------------------------------------------------------------------


def read_jsonl(path, option: str = "--data") -> list[dict]:
    """[{"prompt": str, "response": str}, ...] from a JSONL file; errors name the option (`--data`,
    `--eval-data`), the file and the line, and quote at most SHOWN characters of it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option}: no such file {str(path)!r} (give a JSONL file of "
                                f'{{"prompt": ..., "response": ...}} lines)')
    records = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named like any other bad line
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = parse_json(line, f"{path}:{line_no}")
            except ValueError as err:
                raise ValueError(f"{err}: {shown(as_text(line))}") from None
            if (not isinstance(record, dict) or not isinstance(record.get("prompt"), str)
                    or not isinstance(record.get("response"), str)):
                raise ValueError(f"{path}:{line_no}: each line must be an object with string fields "
                                 f"'prompt' and 'response', got {shown(as_text(line))}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: the file holds no examples")
    return records


SHOWN = 80  # characters of a bad line or text an error message quotes (a line may be megabytes long)


def as_text(line: bytes) -> str:
    """A line of the file as text for a message, whatever its bytes."""
    return line.decode("utf-8", errors="replace").strip()


def shown(text: str) -> str:
    """`text` quoted for an error message, cut to SHOWN characters."""
    return repr(text[:SHOWN]) + (f" ... ({len(text):,} characters)" if len(text) > SHOWN else "")


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


class ByteTokenizer:
    """Text as UTF-8 bytes, for a preset with random weights (no real tokenizer matches them): byte b is token
    3 + b, which in Llama's vocabulary is its byte-fallback token <0xb>; the prompt starts with <s> (1), the
    response ends with </s> (2), padding is <unk> (0). Needs a vocabulary of `vocab_size` = 259 tokens."""

    pad_token_id, bos_token_id, eos_token_id, first_byte_id = 0, 1, 2, 3
    vocab_size = first_byte_id + 256

    def prompt_ids(self, text: str) -> list[int]:
        return [self.bos_token_id] + [self.first_byte_id + b for b in text.encode("utf-8")]

    def response_ids(self, text: str) -> list[int]:
        return [self.first_byte_id + b for b in text.encode("utf-8")] + [self.eos_token_id]


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
# Token tensors
# ----------------------------------------------------------------------------------------------------


def tokenize_records(records: list[dict], tokenizer, max_seq_len: int, source: str) -> TokenData:
    """Prompt + response token ids, labels -100 on the prompt (the loss is on the response only)."""
    rows, label_rows = [], []
    for i, record in enumerate(records):
        try:
            prompt = tokenizer.prompt_ids(record["prompt"])
            response = tokenizer.response_ids(record["response"])
        except ValueError as err:  # the tokenizer's message may quote the whole text: cut it
            message = str(err)
            cut = f" ... (message cut, {len(message):,} characters)" if len(message) > 4 * SHOWN else ""
            raise ValueError(f"{source}: example {i + 1}: {message[:4 * SHOWN]}{cut}") from None
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
