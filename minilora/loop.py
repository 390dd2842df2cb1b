"""The training loop for real: minilora/core/qlora.py's `train_step`, with everything a run needs around it.

The idea is the core's train_step: the mean loss of grad_accum micro-batches, one backward each, the gradient
norm clipped, one optimizer step. Here it is what minilora.data.finetune (the notebooks), minilora.train (the
command line) and scripts/qlora_7b.py (the 7B run) all train through:

    for each of grad_accum micro-batches:   loss = model(**batch).loss (+ extra_loss, e.g. AdaLoRA's penalty)
                                             (loss / grad_accum).backward()
    clip the gradient norm to max_grad_norm
    optimizer.step()
    after_step(step)                         AdaLoRA's allocator: it needs the gradients, so before zero_grad
    scheduler.step(); optimizer.zero_grad()

Several processes (minilora.distributed, under torchrun) share the same step through a `Job`: it says which
micro-batches this process computes, when gradients are reduced, and how the optimizer reaches its shard.
The `Job` here is the single process, where every one of those is the plain thing; minilora.distributed
overrides the handful of methods for DDP and FSDP. tests/test_core.py proves a single-process step equal to
the core's.

Read first: `train_step`; then `TokenData` (the one data class), `Batches` (the one sampler), `Job`,
`evaluate` (the one evaluator), `Progress`.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from minilora.checks import check_int

# ----------------------------------------------------------------------------------------------------
# Examples and micro-batches
# ----------------------------------------------------------------------------------------------------


@dataclass
class TokenData:
    """n examples, right-padded to a common length: input_ids, labels (-100 = not scored), attention_mask.

    Right padding is harmless for a causal LM: a pad token sits after every real token, so no real token
    attends to it, and its label is -100, so it adds nothing to the loss. `attention_mask` defaults to all
    ones (examples of one length, as the running example's). Index or slice it like a tensor (`data[:100]`,
    `data[idx]`) to get a smaller TokenData.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.attention_mask is None:
            self.attention_mask = torch.ones_like(self.input_ids)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index) -> TokenData:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TokenData(self.input_ids[index], self.labels[index], self.attention_mask[index])

    def batch(self, index) -> dict[str, torch.Tensor]:
        """The examples at `index` as model keyword arguments, trimmed to the longest one among them."""
        mask = self.attention_mask[index]
        length = int(mask.sum(dim=1).max())
        return {"input_ids": self.input_ids[index, :length], "labels": self.labels[index, :length],
                "attention_mask": mask[:, :length]}


class Batches:
    """Micro-batches in shuffled epochs. `position` (micro-batches served so far) is the sampler's whole
    state: epoch e's order is randperm(n) drawn from a generator seeded with seed + e, so any position can
    be restarted exactly (a resumed run sets `position` and continues with the same batches)."""

    def __init__(self, data: TokenData, batch_size: int, seed: int = 0, position: int = 0):
        check_int("batch_size", batch_size, 1)
        if batch_size > len(data):
            raise ValueError(f"batch_size={batch_size} is larger than the {len(data)} training examples")
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


# ----------------------------------------------------------------------------------------------------
# One process, or one of several: what the step asks of the job
# ----------------------------------------------------------------------------------------------------


class Job:
    """The single process: it computes every micro-batch, and gradients, clipping and the optimizer are the
    plain PyTorch ones. minilora.distributed.Distributed overrides these methods for DDP and FSDP."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    is_main = True  # the process that writes files and shows progress

    def is_mine(self, micro_batch: int) -> bool:
        return True

    def micro_batches_per_rank(self, grad_accum: int) -> int:
        return grad_accum

    def gradient_sync(self, forward_module: nn.Module, sync: bool):
        return contextlib.nullcontext()

    def sum_over_ranks(self, value: float) -> float:
        return value

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float | None:
        """Clip the total gradient norm to max_norm (None: leave the gradients alone); returns the norm."""
        if max_norm is None:
            return None
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        optimizer.step()

    def zero_grad(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------


def train_step(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, step: int, *,
               grad_accum: int = 1, max_grad_norm: float | None = None, extra_loss=None, after_step=None,
               scheduler=None, job: Job | None = None, autocast=contextlib.nullcontext) -> dict:
    """One optimizer step (step counts from 0); returns {"loss", "lr", "grad_norm"}.

    The loss is the mean over the step's grad_accum micro-batches (all processes together) of the task loss,
    without `extra_loss(model)`, which is added to what is differentiated only. `model` is the module to call
    forward on (under DDP its wrapper); `autocast()` is the context each forward runs in (bf16 autocast, or
    nothing); `after_step(step)` runs after optimizer.step() while the gradients still exist.
    """
    job = job or Job(next(model.parameters()).device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = optimizer.param_groups[0]["lr"]
    mine = job.micro_batches_per_rank(grad_accum)
    loss_sum, done_here = 0.0, 0
    for micro in range(grad_accum):
        batch = batches.next()  # every process advances the same data position ...
        if not job.is_mine(micro):
            continue  # ... and computes only its own micro-batches
        done_here += 1
        batch = {k: v.to(job.device) for k, v in batch.items()}
        with job.gradient_sync(model, sync=done_here == mine):  # reduce after the last micro-batch only
            with autocast():
                loss = model(**batch).loss  # mean cross-entropy over the batch's scored tokens
                total = loss if extra_loss is None else loss + extra_loss(model)
            (total / mine).backward()  # DDP/FSDP average over processes: Σ loss / grad_accum in all
        loss_sum += loss.item()
    grad_norm = job.clip_grad_norm(params, max_grad_norm)
    job.optimizer_step(optimizer, params)
    if after_step is not None:
        after_step(step)
    if scheduler is not None:
        scheduler.step()
    job.zero_grad(optimizer, params)
    return {"loss": job.sum_over_ranks(loss_sum) / grad_accum, "lr": lr, "grad_norm": grad_norm}


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, batch_size: int = 256, autocast=contextlib.nullcontext) -> dict:
    """{"loss": mean cross-entropy per response token, "accuracy": fraction of examples answered exactly}.

    Accuracy is exact match under teacher forcing: an example counts only if the argmax prediction is right
    at every scored position. Because a greedy decoder that has been right so far sees exactly the
    teacher-forced prefix, this equals the exact-match accuracy of greedy generation.
    """
    check_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, tokens, correct = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, targets = logits.float()[:, :-1], batch["labels"][:, 1:]  # position t predicts token t+1
        scored = targets != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
        tokens += int(scored.sum())
        correct += int(((logits.argmax(-1) == targets) | ~scored).all(dim=1).sum())
    model.train(was_training)
    return {"loss": loss_sum / tokens, "accuracy": correct / len(data)}


# ----------------------------------------------------------------------------------------------------
# Progress that keeps logs clean
# ----------------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI, a notebook's captured output) one plain line
    every `every` steps, so a log holds a few lines rather than hundreds of redraws and escape codes."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True, every: int = 0):
        self.total, self.desc, self.done = total, desc, initial
        self.every = every or max(1, total // 10)
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, **numbers: float) -> None:
        self.done += 1
        shown = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items() if v is not None)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(shown)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            print(f"{self.desc} step {self.done}/{self.total}: {shown}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
