"""AdaLoRA: LoRA whose rank moves to where it matters (Zhang et al., 2023).

LoRA gives every adapted matrix the same rank r. But not every matrix needs the same: in the AdaLoRA paper
the feed-forward and late-layer matrices want more rank than the early attention ones. AdaLoRA starts every
matrix at a generous rank `init_r`, scores each rank-one piece by how much the loss depends on it, and keeps
a shrinking global budget of the best pieces, ending at `target_r` per matrix *on average*.

To make "one rank-one piece" well defined, the update is written in SVD form:

    ΔW = P Λ Q,     P = lora_B: (d_out, r),  Λ = diag(lora_E): r values,  Q = lora_A: (r, d_in)

Triplet i is (column i of P, Λ_i, row i of Q). Zeroing Λ_i removes exactly that piece, and the triplet can
come back later if training makes Λ_i non-zero again. No SVD is ever computed: a penalty pushes P and Q
towards orthonormal columns/rows (`orthogonal_penalty`), which is what makes "Λ_i small" mean "piece i small".

Reading order: `SVDLinear` (one layer), `AdaLoraConfig`, `add_adalora`, `orthogonal_penalty` (these four live
in minilora.svd_adapter and are exported here), then the three steps of the allocator as plain functions,
`budget_schedule`, `update_importance` (+ `triplet_score`) and `mask_to_budget`, and finally `RankAllocator`,
which strings them together once per training step:

    add_adalora(model, config); allocator = RankAllocator(model, config)
    loss = model(input_ids, labels=labels).loss + config.orth_reg_weight * orthogonal_penalty(model)
    loss.backward()
    optimizer.step()
    allocator.update_and_allocate(step)      # after step(), before zero_grad(): it needs the gradients
    optimizer.zero_grad()

Everything mirrors peft 0.21's AdaLoRA number for number (tests/test_adalora.py trains both side by side and
compares loss, budget and rank pattern at every step). Where peft crashes or stays silent, we raise a readable
error or warn instead (config validation; a forgotten `update_and_allocate`, peft issue #1801).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from minilora.checks import is_int
from minilora.svd_adapter import (  # the adapter itself; exported from here too, as chapter 2 teaches it
    INIT_STD,
    AdaLoraConfig,
    SVDLinear,
    add_adalora,
    orthogonal_penalty,
    svd_layers,
)

__all__ = ["INIT_STD", "AdaLoraConfig", "SVDLinear", "add_adalora", "orthogonal_penalty", "svd_layers",
           "budget_schedule", "update_importance", "triplet_score", "mask_to_budget", "RankAllocator"]

# ----------------------------------------------------------------------------------------------------
# The allocator's three steps, as plain functions
# ----------------------------------------------------------------------------------------------------


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:
    """(budget, mask_now): how many triplets may survive after `step`, and whether to mask at this step.

    AdaLoRA's global budget scheduler, with T = total_step:
      step <= tinit:             b = init_budget,  no masking (warm-up: let the scores settle);
      step >  T - tfinal:        b = target_budget, mask (final phase);
      otherwise, c = 1 − (step − tinit) / (T − tfinal − tinit):
                                 b = int((init_budget − target_budget) · c³ + target_budget),
                                 mask when step % deltaT == 0.
    The cubic falls fast early, when plenty of triplets are obviously useless, and slowly near the target.
    """
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * (remaining ** 3) + target_budget)
    return budget, step % deltaT == 0


def update_importance(param: torch.Tensor, grad: torch.Tensor, exp_avg_ipt: torch.Tensor,
                      exp_avg_unc: torch.Tensor, beta1: float,
                      beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step of sensitivity and uncertainty for every element of a parameter.

        I = |p ⊙ ∇p|                      sensitivity: first-order loss change if p were set to zero
        Ī ← β1 Ī + (1 − β1) I             smoothed sensitivity
        Ū ← β2 Ū + (1 − β2) |I − Ī|       uncertainty: how much I jumps around its smoothed value (new Ī)

    Returns the new (Ī, Ū); the element's importance is then s = Ī · Ū.
    """
    sensitivity = (param * grad).abs()
    exp_avg_ipt = beta1 * exp_avg_ipt + (1 - beta1) * sensitivity
    exp_avg_unc = beta2 * exp_avg_unc + (1 - beta2) * (sensitivity - exp_avg_ipt).abs()
    return exp_avg_ipt, exp_avg_unc


def triplet_score(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki): one importance per triplet, shape (r,).

    score_A (r, in), score_E (r, 1), score_B (out, r) are the element importances Ī · Ū. The means make a
    row of Q and a column of P count as much as their single singular value, whatever the layer's width.
    """
    # s_E + (mean_A + mean_B), in this order: it is how the reference adds them, and rounding matters when
    # scores are compared against a threshold.
    return score_E.view(-1) + (score_A.mean(dim=1) + score_B.mean(dim=0))


def mask_to_budget(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """Which triplets survive: {name: bool tensor (r,)}, keeping the `budget` best scores over ALL layers.

    The threshold is the k-th smallest score with k = (number of triplets) − budget; every triplet scoring
    at or below it is dropped (ties drop together, so slightly fewer than `budget` may survive). Because the
    ranking is global, one layer can keep all its triplets while another loses all of them.
    """
    all_scores = torch.cat([s.view(-1) for s in scores.values()])
    n_drop = all_scores.numel() - budget
    if n_drop <= 0:  # nothing to drop (e.g. init_r == target_r); peft's kthvalue would crash on k = 0
        return {name: torch.ones(s.numel(), dtype=torch.bool, device=s.device) for name, s in scores.items()}
    threshold = torch.kthvalue(all_scores, n_drop).values
    return {name: s.view(-1) > threshold for name, s in scores.items()}


# ----------------------------------------------------------------------------------------------------
# The allocator
# ----------------------------------------------------------------------------------------------------


class RankAllocator:
    """Keeps the importance scores and masks Λ to the scheduled budget; call `update_and_allocate(step)`
    once per optimizer step, after `optimizer.step()` and before `optimizer.zero_grad()`.

    Forgetting that call is a silent failure in peft (issue #1801: the ranks simply never change). Here a
    forward hook on the first SVDLinear watches for it: if a training forward runs while the adapter
    weights have changed since the last `update_and_allocate` (an optimizer step happened without one),
    it warns. `update_and_allocate` also warns when the step number does not advance by exactly one.
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig):
        if not isinstance(config, AdaLoraConfig):
            raise TypeError(f"config must be a minilora.adalora.AdaLoraConfig, got {type(config).__name__}")
        self.config = config
        self.layers = svd_layers(model)
        if not self.layers:
            raise ValueError(f"RankAllocator: {type(model).__name__} has no SVDLinear layers "
                             f"(call add_adalora(model, config) first)")
        self.init_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.budget = self.init_budget
        self.pattern_fixed = False
        self.last_step: int | None = None
        self.reset_scores()
        # The forgotten-call watch: a snapshot of every Λ, taken at each update_and_allocate.
        self._snapshot: torch.Tensor | None = None
        self._warned = False
        first_layer = next(iter(self.layers.values()))
        self._hook = first_layer.register_forward_pre_hook(self._check_called)

    # -- importance ------------------------------------------------------------------------------------

    def reset_scores(self) -> None:
        """Forget all EMAs: {"<layer>.lora_A": tensor, ...} for Ī and Ū; `updates` counts score updates."""
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.updates = 0

    def _named_params(self):
        for name, layer in self.layers.items():
            for kind in ("lora_A", "lora_E", "lora_B"):
                yield f"{name}.{kind}", getattr(layer, kind)

    def update_scores(self) -> None:
        """One `update_importance` step for every element of every P, Λ, Q, from the current gradients."""
        for key, param in self._named_params():
            if param.grad is None:
                raise RuntimeError(
                    f"update_and_allocate: {key} has no gradient. Call it after loss.backward() and "
                    f"optimizer.step(), before optimizer.zero_grad(): the importance scores need the "
                    f"gradients.")
            if key not in self.exp_avg_ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(param, dtype=torch.float32)
                self.exp_avg_unc[key] = torch.zeros_like(param, dtype=torch.float32)
            with torch.no_grad():
                self.exp_avg_ipt[key], self.exp_avg_unc[key] = update_importance(
                    param.detach(), param.grad, self.exp_avg_ipt[key], self.exp_avg_unc[key],
                    self.config.beta1, self.config.beta2)
        self.updates += 1

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{layer name: S (r,)}: the current importance of every triplet (`triplet_score` of Ī · Ū)."""
        if self.updates == 0:
            raise RuntimeError("no importance scores yet: update_and_allocate(step) must run at every step "
                               "from the first one, so the scores exist before the first masking step")
        scores = {}
        for name in self.layers:
            s = {kind: self.exp_avg_ipt[f"{name}.{kind}"] * self.exp_avg_unc[f"{name}.{kind}"]
                 for kind in ("lora_A", "lora_E", "lora_B")}
            scores[name] = triplet_score(s["lora_A"], s["lora_E"], s["lora_B"])
        return scores

    # -- budget and masking ----------------------------------------------------------------------------

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, mask_now) at `step` for this model's budgets and the config's schedule."""
        c = self.config
        return budget_schedule(step, self.init_budget, self.target_budget, c.tinit, c.tfinal, c.total_step,
                               c.deltaT)

    def mask(self, budget: int) -> None:
        """Zero Λ_i of every triplet outside the `budget` best and record the verdict in `rank_mask`."""
        keep = mask_to_budget(self.triplet_scores(), budget)
        for name, layer in self.layers.items():
            layer.rank_mask = keep[name]
        self._apply_rank_masks()

    def _apply_rank_masks(self) -> None:
        # Only Λ_i is zeroed: P and Q keep their values, and until the pattern is fixed the optimizer can
        # make Λ_i non-zero again if the loss wants that triplet back.
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """{layer name: [kept?] * init_r} after the latest masking (all True before the first one)."""
        return {name: layer.rank_mask.tolist() for name, layer in self.layers.items()}

    @property
    def ranks(self) -> dict[str, int]:
        """{layer name: number of kept triplets}."""
        return {name: int(layer.rank_mask.sum()) for name, layer in self.layers.items()}

    # -- once per step ---------------------------------------------------------------------------------

    def update_and_allocate(self, step: int) -> int:
        """Update the scores and mask to the budget of `step`; returns that budget.

        As the reference (peft's AdaLoraModel.update_and_allocate), with F = total_step − tfinal:
          step < F:   update the scores; mask if `budget_schedule` says so;
          step == F:  no score update; mask to target_budget once, fix the pattern, forget the scores;
          step > F:   re-apply the fixed pattern (the optimizer may have moved the zeroed Λ_i).
        If the call at F was skipped, the first later call fixes the pattern instead.
        """
        if not is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got step={step!r}")
        if self.last_step is not None and step != self.last_step + 1:
            warnings.warn(f"update_and_allocate(step={step}) follows step={self.last_step}: call it once per "
                          f"optimizer step with consecutive step numbers, or the budget schedule and the "
                          f"scores fall out of step", UserWarning, stacklevel=2)
        self.last_step = step
        final_start = self.config.total_step - self.config.tfinal
        if step < final_start:
            self.update_scores()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.mask(budget)
        elif not self.pattern_fixed:
            budget = self.target_budget
            self.mask(budget)
            self.pattern_fixed = True
            self.reset_scores()
        else:
            budget = self.target_budget
            self._apply_rank_masks()
        self.budget = budget
        self._snapshot = self._all_E()
        return budget

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
                          "it the ranks never change and the run is plain LoRA (peft issue #1801).",
                          UserWarning, stacklevel=2)
