"""Beyond one GPU: the training loop under `torchrun`, with PyTorch's own DDP or FSDP.

    torchrun --nproc_per_node 4 -m minilora.train --recipe qlora-7b --model <folder> --distributed ddp ...

`torchrun` starts one process per GPU and gives each its RANK, LOCAL_RANK and WORLD_SIZE in the environment.
Every process builds the same model from the same seed, reads the same data order, and does its share of
each optimizer step. `Distributed` is everything the step (`minilora.loop.train_step`, through the methods of
`minilora.loop.Job`) and the run (`minilora.train`) need to know about that; in a single process every
method is the plain PyTorch call, so the loop reads the same with or without it.

Who does what in one optimizer step (W processes, grad_accum = G micro-batches per step, G divisible by W):

    micro-batch i of the step goes to rank i % W           each rank runs G / W forward/backward passes
    backward of loss / (G / W) on every rank                DDP/FSDP then *average* the gradients over ranks:
                                                            (1/W) Σ_ranks Σ_mine loss_i / (G/W) = Σ_all loss_i / G
    → exactly the gradient of the single-process step with the same global batch (batch_size × G), up to the
    order of floating-point additions. tests/test_distributed.py checks the losses of 2 gloo processes on
    CPU against one process.

What is synchronized — only the trainable (LoRA) gradients. The frozen base never gets a gradient, so there is
nothing to all-reduce for it:

* DDP (`mode="ddp"`): torch's DistributedDataParallel registers its all-reduce hooks on parameters with
  requires_grad only, so it reduces the adapter's gradients and nothing else. Two settings matter for a
  QLoRA model: no buffer syncing, `forward_sync_buffers=False` (`broadcast_buffers=False` before torch 2.12;
  the 4-bit codes are *buffers*, and DDP would otherwise re-broadcast all ~3.9 GB of a 7B model before every
  forward) and `init_sync=False` (no broadcast of every parameter and buffer at start either).
  Instead we broadcast the trainable parameters from rank 0 ourselves (a few MB). `no_sync()` skips the
  all-reduce for all but the last micro-batch of a step.

* FSDP (`mode="fsdp"`, PyTorch's FSDP2 `fully_shard`): each LoRA layer's `lora_A` and `lora_B` are sharded
  along their first dimension, so each rank keeps 1/W of the adapter, of its gradients (reduce-scatter instead
  of all-reduce) and of its optimizer state; FSDP all-gathers a layer's adapter just before the layer runs.
  The quantized base is *not* sharded: every frozen parameter is passed as `ignored_params`, and the 4-bit
  codes and their constants are buffers, which FSDP never shards. Each GPU therefore holds the whole 4-bit
  base (3.9 GB for 7B, 37 GB for 70B) plus 1/W of the adapter state.

  Why not shard the base too? FSDP flattens the parameters it manages into one buffer per group and
  all-gathers it, which needs every piece to share one dtype. Packed NF4 codes are uint8 (2 weights per byte)
  and their absmax constants fp32, so they cannot join the bf16/fp32 flat buffer. bitsandbytes and peft solve
  this with `bnb_4bit_quant_storage=torch.bfloat16`: the packed bytes are *reinterpreted* as a bf16 tensor
  of half as many elements, so FSDP can shard and all-gather them like any bf16 weight (the quantization
  state travels beside them), at the price of an all-gather of the base before every layer. We keep the
  readable layout (uint8 buffers, replicated): for QLoRA the base is 4-bit and fits on one GPU, which is
  the whole point; the sharded part, the adapter's fp32 weights, gradients and Adam moments, is the part
  that grows with the number of trained parameters.

  The optimizer steps on each rank's *local shard* (`optimizer_params`): ordinary contiguous tensors that
  share storage with FSDP's sharded parameters, so minilora's PagedAdamW (which pages plain tensors) works
  unchanged. Checkpoints are written by rank 0 in the single-process format: the adapter is gathered with
  `gathered()` (FSDP's unshard) and the Adam moments with `full_optimizer_state`, and `--resume` slices them
  back (`load_optimizer_state`, `copy_into_parameter`), so a run may be resumed on a different number of
  GPUs or without torchrun.

Rank 0 alone writes checkpoints, metrics and plots; all ranks evaluate (an FSDP forward needs every rank).
The process group uses NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from minilora.loop import Job
from minilora.lora import LoRALinear
from minilora.options import DISTRIBUTED_MODES as MODES


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"the environment variable WORLD_SIZE must be a positive integer, got {value!r}")
    return int(value)


def resolve_mode(mode: str) -> str:
    """"auto" → "ddp" under torchrun with more than one process, else "none"; the others are checked."""
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "ddp" if world_size_from_env() > 1 else "none"
    if mode != "none" and "RANK" not in os.environ:
        raise ValueError(f"--distributed {mode} needs the process to be started by torchrun (RANK and WORLD_SIZE "
                         f"are not set), e.g. torchrun --nproc_per_node 2 -m minilora.train ...")
    return mode


def check_options(mode: str, method: str, grad_accum: int, world_size: int) -> None:
    """Options that cannot work together; ValueError naming them."""
    if grad_accum % world_size:
        raise ValueError(f"--grad-accum={grad_accum} must be divisible by the number of processes "
                         f"(WORLD_SIZE={world_size}): each optimizer step splits its micro-batches among them")
    if mode == "fsdp" and method not in ("lora", "qlora"):
        raise ValueError(f"--distributed fsdp shards the LoRA adapter, so it needs --method lora or qlora, "
                         f"got --method {method}; use --distributed ddp for {method}")


@dataclass
class Distributed(Job):
    """This process's place in the job, and the few collective operations the training loop needs: the
    methods of minilora.loop.Job that `train_step` calls, for DDP and FSDP, plus what checkpoints need."""

    mode: str = "none"  # "none", "ddp" or "fsdp"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    # --- what train_step asks (minilora.loop.Job) ------------------------------------------------------

    def is_mine(self, micro_batch: int) -> bool:
        """Micro-batch `micro_batch` (0 … grad_accum-1) of a step is computed by rank micro_batch % W."""
        return micro_batch % self.world_size == self.rank

    def micro_batches_per_rank(self, grad_accum: int) -> int:
        return grad_accum // self.world_size

    def gradient_sync(self, forward_module: nn.Module, sync: bool):
        """Context for one micro-batch's backward: sync=False skips the gradient reduction (the gradients
        just accumulate locally); the last micro-batch of a step syncs. The result is the same either way,
        only the communication differs."""
        if self.mode == "ddp" and not sync:
            return forward_module.no_sync()
        if self.mode == "fsdp":
            forward_module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def sum_over_ranks(self, value: float) -> float:
        """Σ value over all ranks (e.g. the loss each rank summed over its micro-batches)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float | None:
        """As one process; under FSDP the total norm is a DTensor, made a plain number here."""
        if max_norm is None:
            return None
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        """FSDP: the optimizer updates each parameter's local shard (`optimizer_params`), so each shard first
        gets the local part of its (already reduce-scattered, clipped) gradient."""
        if self.mode == "fsdp":
            for p, local in zip(params, self._opt_params):
                local.grad = None if p.grad is None else p.grad.to_local()
        optimizer.step()

    def zero_grad(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.mode == "fsdp":
            for p in params:
                p.grad = None

    # --- the model ------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call forward on: `model` itself, a DDP wrapper around it, or `model` after FSDP's
        `fully_shard` (which changes it in place). Checkpoints, evaluation and the optimizer keep using
        `model`; DDP's wrapper only adds the gradient hooks."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.broadcast_trainable(model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer traffic, ever (torch renamed broadcast_buffers to forward_sync_buffers in 2.12).
            no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                              inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
            return DistributedDataParallel(model, device_ids=device_ids, init_sync=False, **no_buffer_sync)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            frozen = {p for p in model.parameters() if not p.requires_grad}
            for layer in model.modules():  # one FSDP unit per LoRA layer: its lora_A and lora_B
                if isinstance(layer, LoRALinear):
                    fully_shard(layer, mesh=mesh, ignored_params=frozen)
            fully_shard(model, mesh=mesh, ignored_params=frozen)  # the root: schedules the units
            return model
        return model

    @torch.no_grad()
    def broadcast_trainable(self, model: nn.Module) -> None:
        """Make every rank's trainable parameters equal to rank 0's (identical seeds already give equal
        values; this guards against any rank having drawn a different random number)."""
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)

    def optimizer_params(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """What the optimizer updates: the parameters themselves, or under FSDP each parameter's local shard
        (a leaf tensor sharing storage with it, so updating it updates the sharded parameter)."""
        self._opt_params = [p.to_local().detach() for p in params] if self.mode == "fsdp" else params
        return self._opt_params

    def run_on_main(self, fn, *args):
        """fn(*args) on rank 0 only (e.g. checking or creating the run folder); if it raises, every rank
        raises too (instead of hanging in the next collective). Returns fn's result on rank 0, else None."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args)
            except (ValueError, OSError) as err:
                error = err
        self.broadcast_error(error)
        return result

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_error(self, error: BaseException | None) -> None:
        """Rank 0 checks the run folder; if it fails, every rank must stop (not hang in the next collective)."""
        if not self.active:
            if error is not None:
                raise error
            return
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise ValueError(f"rank 0 failed: {message[0]}")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # --- checkpoints: rank 0 writes the single-process format -------------------------------------------

    @contextlib.contextmanager
    def gathered(self, model: nn.Module):
        """Inside: `model`'s parameters are the full, plain tensors on every rank (FSDP all-gathers them), so
        the single-process saving code can read them. Read only: FSDP discards the gathered copies on exit."""
        if self.mode != "fsdp":
            yield model
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        try:
            yield model
        finally:
            for unit in units:
                unit.reshard()

    @torch.no_grad()
    def copy_into_parameter(self, param: torch.Tensor, full: torch.Tensor) -> None:
        """param ← full; under FSDP only this rank's rows of `full` go into its local shard."""
        if hasattr(param, "to_local"):
            local = param.to_local()
            local.copy_(self.my_rows(full, local.shape[0]))
        else:
            param.copy_(full)

    def my_rows(self, full: torch.Tensor, rows: int) -> torch.Tensor:
        """This rank's piece of `full` along dim 0, as FSDP cuts it: chunks of ceil(n / W) rows, the last ones
        shorter or empty (torch.chunk's rule)."""
        chunk = math.ceil(full.shape[0] / self.world_size)
        start = min(self.rank * chunk, full.shape[0])
        piece = full[start:start + chunk]
        if piece.shape[0] != rows:
            raise ValueError(f"rank {self.rank}: expected {rows} rows of a {tuple(full.shape)} tensor, "
                             f"the chunk rule gives {piece.shape[0]}")
        return piece

    def gather_rows(self, local: torch.Tensor, full_rows: int) -> torch.Tensor:
        """The inverse of `my_rows`: every rank's piece, concatenated in rank order (a collective)."""
        chunk = math.ceil(full_rows / self.world_size)
        padded = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[:local.shape[0]] = local.to(self.device)
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        return torch.cat(pieces)[:full_rows].cpu()

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict:
        """optimizer.state_dict() as one process would have it (full-size moments). Under FSDP a collective:
        every rank must call it. `params` are the model's parameters in the optimizer's order."""
        state = optimizer.state_dict()
        if self.mode != "fsdp":
            return state
        full = {}
        for index, param in enumerate(params):
            saved = state["state"].get(index)
            if saved is None:
                continue
            full[index] = {key: (self.gather_rows(value, param.shape[0]).reshape(param.shape)
                                 if torch.is_tensor(value) and value.dim() > 0 else value)
                           for key, value in saved.items()}
        return {"state": full, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict,
                             opt_params: list[torch.Tensor]) -> None:
        """The inverse of `full_optimizer_state`: each rank keeps its rows of every moment."""
        if self.mode == "fsdp":
            mine = {}
            for index, saved in state["state"].items():
                rows = opt_params[index].shape[0]
                mine[index] = {key: (self.my_rows(value, rows).clone()
                                     if torch.is_tensor(value) and value.dim() > 0 else value)
                               for key, value in saved.items()}
            state = {"state": mine, "param_groups": state["param_groups"]}
        optimizer.load_state_dict(state)


def setup(mode: str, device: torch.device) -> Distributed:
    """Join the job torchrun started (or stay alone for mode "none"); returns this process's `Distributed`.

    `device` is the device the run asked for; under torchrun a CUDA run uses GPU LOCAL_RANK. The process
    group's backend follows the device: NCCL for CUDA tensors, gloo for CPU tensors.
    """
    mode = resolve_mode(mode)
    if mode == "none":
        return Distributed(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    world_size = world_size_from_env()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(mode=mode, rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       owns_group=owns_group)
