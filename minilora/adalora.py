"""AdaLoRA for real: the importance scores, budget schedule and `RankAllocator` of minilora/core/adalora.py,
with the checks and the watch a training run needs (Zhang et al., 2023; chapter 2).

The idea is minilora/core/adalora.py: read that first. The allocator's three steps are its plain functions
(`budget_schedule`, `update_importance` + `triplet_score`, `mask_to_budget`), used here as they are. This
file's `RankAllocator` is the core's, plus: its arguments checked, a readable error where peft crashes, a
warning where peft stays silent (a forgotten `update_and_allocate`, peft issue #432; step numbers that skip),
and the state a checkpoint needs. The layer, config and penalty are minilora.svd_adapter's, exported here too.

    add_adalora(model, config); allocator = RankAllocator(model, config)
    loss = model(input_ids, labels=labels).loss + config.orth_reg_weight * orthogonal_penalty(model)
    loss.backward()
    optimizer.step()
    allocator.update_and_allocate(step)      # after step(), before zero_grad(): it needs the gradients
    optimizer.zero_grad()

Read first: `RankAllocator.update_and_allocate`. Everything mirrors peft 0.21's AdaLoRA number for number
(tests/test_adalora.py trains both side by side); tests/test_core.py proves the allocator equal to the core's.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from minilora.checks import is_int
from minilora.core import adalora as core
from minilora.core.adalora import INIT_STD, budget_schedule, mask_to_budget, triplet_score, update_importance
from minilora.svd_adapter import (  # the adapter itself; exported from here too, as chapter 2 teaches it
    AdaLoraConfig,
    SVDLinear,
    add_adalora,
    orthogonal_penalty,
    svd_layers,
)

__all__ = ["INIT_STD", "AdaLoraConfig", "SVDLinear", "add_adalora", "orthogonal_penalty", "svd_layers",
           "budget_schedule", "update_importance", "triplet_score", "mask_to_budget", "RankAllocator"]


class RankAllocator(core.RankAllocator):
    """minilora.core.adalora.RankAllocator: call `update_and_allocate(step)` once per optimizer step, after
    `optimizer.step()` and before `optimizer.zero_grad()`. Besides the core's work it

    * checks its arguments, and says what is wrong where peft would crash (no gradient, no scores yet);
    * watches for a forgotten call, a silent failure in peft (peft issue #432: the ranks simply never change):
      a forward hook on the first SVDLinear warns if a training forward runs while the adapter weights have
      changed since the last `update_and_allocate` (an optimizer step happened without one), and
      `update_and_allocate` warns when the step number does not advance by exactly one;
    * keeps `budget`, `ranks` and `rank_pattern` for reports, and a state_dict for checkpoints.
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig):
        if not isinstance(config, AdaLoraConfig):
            raise TypeError(f"config must be a minilora.adalora.AdaLoraConfig, got {type(config).__name__}")
        super().__init__(model, config)  # finds the SVDLinear layers, changes nothing
        if not self.layers:
            raise ValueError(f"RankAllocator: {type(model).__name__} has no SVDLinear layers "
                             f"(call add_adalora(model, config) first)")
        self.budget = self.init_budget
        self.last_step: int | None = None
        # The forgotten-call watch: a snapshot of every Λ, taken at each update_and_allocate.
        self._snapshot: torch.Tensor | None = None
        self._warned = False
        first_layer = next(iter(self.layers.values()))
        self._hook = first_layer.register_forward_pre_hook(self._check_called)

    def reset_scores(self) -> None:
        """The core's: forget all EMAs; `updates` counts the score updates since."""
        super().reset_scores()
        self.updates = 0

    def update_scores(self) -> None:
        for name, layer in self.layers.items():
            for kind in core.KINDS:
                if getattr(layer, kind).grad is None:
                    raise RuntimeError(
                        f"update_and_allocate: {name}.{kind} has no gradient. Call it after loss.backward() and "
                        f"optimizer.step(), before optimizer.zero_grad(): the importance scores need the "
                        f"gradients.")
        super().update_scores()
        self.updates += 1

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        if self.updates == 0:
            raise RuntimeError("no importance scores yet: update_and_allocate(step) must run at every step "
                               "from the first one, so the scores exist before the first masking step")
        return super().triplet_scores()

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """{layer name: [kept?] * init_r} after the latest masking (all True before the first one)."""
        return {name: layer.rank_mask.tolist() for name, layer in self.layers.items()}

    @property
    def ranks(self) -> dict[str, int]:
        """{layer name: number of kept triplets}."""
        return {name: int(layer.rank_mask.sum()) for name, layer in self.layers.items()}

    def update_and_allocate(self, step: int) -> int:
        """The core's update_and_allocate (scores, then the mask of `step`'s budget; from step F = total_step −
        tfinal on the pattern is fixed), after checking `step`; returns the budget. If the call at F was
        skipped, the first later call fixes the pattern instead."""
        if not is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got step={step!r}")
        if self.last_step is not None and step != self.last_step + 1:
            warnings.warn(f"update_and_allocate(step={step}) follows step={self.last_step}: call it once per "
                          f"optimizer step with consecutive step numbers, or the budget schedule and the "
                          f"scores fall out of step", UserWarning, stacklevel=2)
        self.last_step = step
        self.budget = super().update_and_allocate(step)
        self._snapshot = self._all_E()
        return self.budget

    # -- saving and resuming ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the next allocation depends on: the EMAs, the phase, and every layer's rank mask."""
        return {"exp_avg_ipt": dict(self.exp_avg_ipt), "exp_avg_unc": dict(self.exp_avg_unc),
                "updates": self.updates, "budget": self.budget, "pattern_fixed": self.pattern_fixed,
                "last_step": self.last_step,
                "rank_masks": {name: layer.rank_mask.clone() for name, layer in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; call it after the adapter weights are back in place."""
        if set(state["rank_masks"]) != set(self.layers):
            raise ValueError(f"RankAllocator.load_state_dict: the saved layers differ from this model's "
                             f"(e.g. {sorted(set(state['rank_masks']) ^ set(self.layers))[:3]})")
        self.exp_avg_ipt, self.exp_avg_unc = dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        self.updates, self.budget = state["updates"], state["budget"]
        self.pattern_fixed, self.last_step = state["pattern_fixed"], state["last_step"]
        for name, layer in self.layers.items():
            layer.rank_mask = state["rank_masks"][name].to(layer.rank_mask.device)
        self._snapshot = self._all_E()

    def rank_grid(self) -> tuple[list[int], list[str], list[list[int]]]:
        """(layer numbers, module kinds, grid) with grid[i][j] = kept triplets of kind j in layer i.

        For the paper's heatmap in miniature: "model.layers.3.mlp.up_proj" is layer 3, kind "up_proj" (the
        first all-digit part of the path and the last part). A layer without some kind gets 0 there.
        """
        cells = {}
        for name, rank in self.ranks.items():
            parts = name.split(".")
            numbers = [int(part) for part in parts if part.isdigit()]
            if not numbers:
                raise ValueError(f"rank_grid: cannot tell the layer number of {name!r} (no numeric part)")
            cells[(numbers[0], parts[-1])] = rank
        layers = sorted({layer for layer, _ in cells})
        kinds = list(dict.fromkeys(kind for _, kind in cells))
        grid = [[cells.get((layer, kind), 0) for kind in kinds] for layer in layers]
        return layers, kinds, grid

    # -- the forgotten-call watch ----------------------------------------------------------------------

    def _all_E(self) -> torch.Tensor:
        return torch.cat([layer.lora_E.detach().view(-1) for layer in self.layers.values()]).clone()

    def _check_called(self, module: nn.Module, args) -> None:
        if self._warned or not (module.training and torch.is_grad_enabled()):
            return
        if self._snapshot is None:  # first training forward: remember where the weights start
            self._snapshot = self._all_E()
        elif not torch.equal(self._snapshot, self._all_E()):
            self._warned = True
            warnings.warn("AdaLoRA: the adapter weights changed since the last allocator.update_and_allocate"
                          "(step) call. Call it after every optimizer.step() and before zero_grad(); without "
                          "it the ranks never change and the run is plain LoRA (peft issue #432).",
                          UserWarning, stacklevel=2)
