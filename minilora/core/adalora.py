"""Chapter 2, AdaLoRA: LoRA whose rank moves to where it matters (Zhang et al., 2023).

AdaLoRA writes each update in SVD form and keeps a shrinking global budget of its best rank-one pieces:

    ΔW = P Λ Q,     P = lora_B: (d_out, r),  Λ = diag(lora_E): r values,  Q = lora_A: (r, d_in)    (AdaLoRA §3.1)

Triplet i is (column i of P, Λ_i, row i of Q); zeroing Λ_i removes exactly that piece. No SVD is computed: a
penalty keeps P and Q near orthonormal (`orthogonal_penalty`), so that a small Λ_i means a small piece.

Read first: `SVDLinear`, then the allocator's steps `budget_schedule`, `update_importance`, `triplet_score`,
`mask_to_budget`, and `RankAllocator.update_and_allocate`, which strings them together once per step.
minilora/svd_adapter.py and minilora/adalora.py build the real package on this file; tests/test_core.py
proves them equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minilora.core.lora import LoRALinear

INIT_STD = 0.02  # P and Q start as N(0, 0.02²) noise, Λ at zero (peft's and the paper's code)
KINDS = ("lora_A", "lora_E", "lora_B")  # Q, Λ, P


@dataclass
class AdaLoraConfig:
    """AdaLoRA's hyper-parameters; names and defaults as peft's AdaLoraConfig (see `budget_schedule`)."""

    init_r: int = 12  # triplets per matrix at the start, target_r on average at the end
    target_r: int = 8
    tinit: int = 0  # warm-up steps, final steps, masking interval and total steps of `budget_schedule`
    tfinal: int = 0
    deltaT: int = 1
    total_step: int | None = None
    beta1: float = 0.85  # EMA factors of the sensitivity and the uncertainty (`update_importance`)
    beta2: float = 0.85
    orth_reg_weight: float = 0.5  # the loss is task_loss + orth_reg_weight · orthogonal_penalty
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] | list[str] = ("q_proj", "v_proj")


class SVDLinear(LoRALinear):
    """h = base(x) + α/(r0 + 1e-5) · P Λ Q dropout(x): LoRA's layer with singular values in between.

    `scaling` = α (not α/r); the bypass is divided by `ranknum` instead, a buffer fixed at the initial r0, so
    masking triplets never rescales the survivors. `rank_mask` is the allocator's latest verdict per triplet.
    Merging is LoRA's (W0 ← W0 + ΔW), through this layer's `delta_weight`.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0):
        super().__init__(base, r, lora_alpha, lora_dropout)  # Q = lora_A, P = lora_B
        self.scaling = lora_alpha
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **self.adapter_placement()))  # Λ = 0: ΔW = 0 at start
        self.register_buffer("ranknum", torch.tensor(float(r), **self.adapter_placement()), persistent=False)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=self.lora_A.device),
                             persistent=False)

    def reset_lora_parameters(self, init: str | None = None) -> None:
        """P, Q ~ N(0, 0.02²), Λ = 0: ΔW = 0 at start, yet (unlike LoRA's B = 0) Λ gets a gradient at once."""
        with torch.no_grad():
            nn.init.normal_(self.lora_A, mean=0.0, std=INIT_STD)
            nn.init.normal_(self.lora_B, mean=0.0, std=INIT_STD)

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """(x Qᵀ ⊙ Λ) Pᵀ, then α and 1/ranknum in peft's order of operations (so the floats agree bit for bit)."""
        return x @ (self.lora_A * self.lora_E).T @ self.lora_B.T * self.scaling / (self.ranknum + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = α/(ranknum + 1e-5) · P Λ Q, shape (out_features, in_features)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)


def orthogonal_penalty(model: nn.Module) -> torch.Tensor:
    """R = mean over every P and Q of ||Q Qᵀ − I||_F and ||Pᵀ P − I||_F (AdaLoRA eq. 4 squares the norms; the
    authors' code and peft do not, and neither do we). The loss is task_loss + orth_reg_weight · R."""
    terms = []
    for layer in (m for m in model.modules() if isinstance(m, SVDLinear)):
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # both (r, r)
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - identity, ord="fro"))
    return sum(terms) / len(terms)


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:
    """(budget, mask_now): how many triplets may survive after `step`, and whether to mask now (AdaLoRA §3.3, the
    cubic schedule).

      step <= tinit:         b = init_budget, no masking (warm-up: let the scores settle);
      step >  T - tfinal:    b = target_budget, mask (final phase);
      otherwise, with p = 1 − (step − tinit) / (T − tfinal − tinit):
                             b = int((init_budget − target_budget) · p³ + target_budget), mask every deltaT steps.
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
                      exp_avg_unc: torch.Tensor, beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step of sensitivity and uncertainty for every element (AdaLoRA §3.2); returns (Ī, Ū).

        I = |p ⊙ ∇p|   Ī ← β1 Ī + (1 − β1) I   Ū ← β2 Ū + (1 − β2) |I − Ī| (with the new Ī);   s = Ī · Ū
    """
    sensitivity = (param * grad).abs()
    exp_avg_ipt = beta1 * exp_avg_ipt + (1 - beta1) * sensitivity
    exp_avg_unc = beta2 * exp_avg_unc + (1 - beta2) * (sensitivity - exp_avg_ipt).abs()
    return exp_avg_ipt, exp_avg_unc


def triplet_score(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki), shape (r,) (AdaLoRA §3.2): the means make a row of Q and
    a column of P count as much as their one singular value, whatever the layer's width."""
    # s_E + (mean_A + mean_B), in this order: the reference's, and rounding matters at the threshold.
    return score_E.view(-1) + (score_A.mean(dim=1) + score_B.mean(dim=0))


def mask_to_budget(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """{name: bool (r,)}: the triplets that survive, the `budget` best scores over ALL layers (AdaLoRA §3.2).

    Every triplet at or below the k-th smallest score, k = triplets − budget, is dropped (ties go together).
    """
    all_scores = torch.cat([s.view(-1) for s in scores.values()])
    n_drop = all_scores.numel() - budget
    if n_drop <= 0:  # nothing to drop (e.g. init_r == target_r)
        return {name: torch.ones(s.numel(), dtype=torch.bool, device=s.device) for name, s in scores.items()}
    threshold = torch.kthvalue(all_scores, n_drop).values
    return {name: s.view(-1) > threshold for name, s in scores.items()}


class RankAllocator:
    """The scores and the masking (AdaLoRA Algorithm 1): call `update_and_allocate(step)` once per optimizer
    step, after optimizer.step() and before optimizer.zero_grad() (it reads the gradients)."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig):
        self.config = config
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}
        self.init_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.pattern_fixed = False
        self.reset_scores()

    def reset_scores(self) -> None:
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}  # Ī and Ū: {"<layer>.lora_A": tensor, ...}

    def update_scores(self) -> None:
        """One `update_importance` step for every element of every P, Λ, Q, from the current gradients (§3.2)."""
        for name, layer in self.layers.items():
            for kind in KINDS:
                param, key = getattr(layer, kind), f"{name}.{kind}"
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(param, dtype=torch.float32)
                    self.exp_avg_unc[key] = torch.zeros_like(param, dtype=torch.float32)
                with torch.no_grad():
                    self.exp_avg_ipt[key], self.exp_avg_unc[key] = update_importance(
                        param.detach(), param.grad, self.exp_avg_ipt[key], self.exp_avg_unc[key],
                        self.config.beta1, self.config.beta2)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{layer name: S (r,)}, the `triplet_score` of the element importances Ī · Ū."""
        return {name: triplet_score(*(self.exp_avg_ipt[f"{name}.{k}"] * self.exp_avg_unc[f"{name}.{k}"]
                                      for k in KINDS)) for name in self.layers}

    def mask(self, budget: int) -> None:
        """Keep the `budget` best triplets: record the verdict in each `rank_mask`, then zero the others' Λ_i."""
        keep = mask_to_budget(self.triplet_scores(), budget)
        for name, layer in self.layers.items():
            layer.rank_mask = keep[name]
        self.apply_rank_masks()

    def apply_rank_masks(self) -> None:
        # Only Λ_i is zeroed: until the pattern is fixed, training may bring a triplet back.
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)

    def update_and_allocate(self, step: int) -> int:
        """Update the scores and mask to the budget of `step`; returns that budget. With F = T − tfinal:
        step < F: scores, and a mask when the schedule says; step == F: mask to the target once and fix the
        pattern; after that: re-apply it (the optimizer may have moved a zeroed Λ_i)."""
        c = self.config
        if step < c.total_step - c.tfinal:
            self.update_scores()
            budget, mask_now = budget_schedule(step, self.init_budget, self.target_budget, c.tinit, c.tfinal,
                                               c.total_step, c.deltaT)
            if mask_now:
                self.mask(budget)
            return budget
        if not self.pattern_fixed:
            self.mask(self.target_budget)
            self.pattern_fixed = True
            self.reset_scores()
        else:
            self.apply_rank_masks()
        return self.target_budget
