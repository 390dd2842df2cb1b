"""AdaLoRA's adapter: the update in SVD form P Λ Q (`SVDLinear`), its settings (`AdaLoraConfig`), putting it
into a model (`add_adalora`) and the penalty that keeps P and Q orthogonal (`orthogonal_penalty`).

How its rank then moves to where it matters (importance scores, the budget schedule, `RankAllocator`) is
minilora.adalora, chapter 2's module, which also exports every name of this one. The two are apart so that
the adapter files (minilora.adapters) can build AdaLoRA layers without the allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minilora.bypass import (
    LowRankLinear,
    check_base,
    check_bypass_options,
    check_rank_fits,
    check_target_modules,
    find_target_modules,
    wrap_modules,
)
from minilora.checks import check_int, check_number
from minilora.frozen_linear import frozen_linear

INIT_STD = 0.02  # A and B start as N(0, 0.02²) noise, E at zero (peft's and the paper's code)

# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


class SVDLinear(LowRankLinear):
    """h = base(x) + α/(ranknum + 1e-5) · P Λ Q dropout(x): a low-rank bypass with singular values in between.

    `lora_A` = Q (r, in_features), `lora_E` = Λ (r, 1), `lora_B` = P (out_features, r), all trainable.
    `scaling` = lora_alpha (not divided by r as in LoRA); the bypass is divided by `ranknum` instead, a
    buffer fixed at the *initial* r. Masking or pruning triplets never changes it, so the surviving
    triplets keep computing exactly what they did.

    Init: Λ = 0 (the model starts unchanged), P and Q ~ N(0, 0.02²). Unlike LoRA's B = 0 init, P and Q are
    both non-zero, so the gradient reaches Λ from the first step.

    `rank_mask` (bool, one per triplet) is the allocator's latest verdict: False means that triplet's Λ was
    zeroed at the last masking step. Merging (`merge`, `unmerge`, `minilora.lora.merge_lora`) comes from
    minilora.bypass.LowRankLinear and works through `delta_weight`. It is not a LoRALinear: a LoRA adapter file
    or `lora_layers()` never mistakes it for one.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0):
        check_bypass_options(r, lora_alpha, lora_dropout)
        check_base(base)
        check_rank_fits(base, r)   # P Λ Q's triplets are singular directions: at most min(in, out) of them
        super().__init__(base, r, lora_alpha, lora_dropout)   # freezes the base
        self.scaling = lora_alpha
        self.lora_A = self.new_matrix(r, self.in_features)
        self.lora_E = self.new_matrix(r, 1)
        self.lora_B = self.new_matrix(self.out_features, r)
        self.register_buffer("ranknum", torch.tensor(float(r), device=self.lora_A.device), persistent=False)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=self.lora_A.device),
                             persistent=False)
        self.reset_svd_parameters()
        self.train(base.training)

    def reset_svd_parameters(self) -> None:
        """Λ = 0, P and Q ~ N(0, 0.02²): ΔW = 0 at start, yet every parameter gets a gradient."""
        with torch.no_grad():
            self.lora_E.zero_()
            nn.init.normal_(self.lora_A, mean=0.0, std=INIT_STD)
            nn.init.normal_(self.lora_B, mean=0.0, std=INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = frozen_linear(self.base, x)
        if self.merged or self.disabled:  # ΔW already sits inside the base weight, or the bypass is off
            return result
        x_lora = self.lora_dropout(x).to(self.lora_A.dtype)
        # (x Qᵀ ⊙ Λ) Pᵀ in two thin matmuls; scaling α and 1/ranknum as in peft (same order of operations,
        # so the floats agree bit for bit).
        update = x_lora @ (self.lora_A * self.lora_E).T @ self.lora_B.T * self.scaling / (self.ranknum + 1e-5)
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = α/(ranknum + 1e-5) · P Λ Q, shape (out_features, in_features)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def keep_triplets(self, keep: torch.Tensor) -> None:
        """Drop the triplets where `keep` is False for good: slice P, Λ, Q to the survivors.

        `ranknum` stays at the initial r, so the output is unchanged when the dropped Λ_i were already zero
        (which the allocator ensures in its final phase). Loading a pruned adapter uses this; a module may
        end with r = 0 (its bypass then adds zeros). Build the optimizer afterwards: the parameters are new.
        """
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_E.device).view(-1)
        if keep.numel() != self.r:
            raise ValueError(f"keep must have one entry per triplet (r={self.r}), got {keep.numel()} entries")
        trainable = self.lora_A.requires_grad
        self.lora_A = nn.Parameter(self.lora_A.detach()[keep].clone(), requires_grad=trainable)
        self.lora_E = nn.Parameter(self.lora_E.detach()[keep].clone(), requires_grad=trainable)
        self.lora_B = nn.Parameter(self.lora_B.detach()[:, keep].clone(), requires_grad=trainable)
        self.r = int(keep.sum())
        self.rank_mask = torch.ones(self.r, dtype=torch.bool, device=keep.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"ranknum={self.ranknum.item():g}, lora_alpha={self.lora_alpha}, merged={self.merged}")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class AdaLoraConfig:
    """AdaLoRA's hyper-parameters; names and defaults as peft's AdaLoraConfig.

    The schedule has three phases over `total_step` steps (see `budget_schedule`):
      warm-up   steps 0..tinit:                 every matrix keeps init_r triplets, scores accumulate;
      decay     tinit < step < total_step-tfinal: the budget falls (cubic) from init_r·n to target_r·n,
                                                 masking every `deltaT` steps;
      final     the last `tfinal` steps:        the pattern is fixed, the kept triplets fine-tune.
    `beta1`, `beta2`: EMA factors of sensitivity and uncertainty. `orth_reg_weight`: weight of the
    orthogonality penalty in the loss. `lora_alpha`, `lora_dropout`, `target_modules`: as in LoRA.
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    total_step: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] | list[str] = ("q_proj", "v_proj")

    def __post_init__(self):
        check_int("total_step", self.total_step, 1, why=" (the budget schedule is laid out over the whole run)")
        check_int("tinit", self.tinit, 0)
        check_int("tfinal", self.tfinal, 0)
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(
                f"tinit + tfinal must be < total_step to leave steps for the budget to decay, got "
                f"tinit={self.tinit} + tfinal={self.tfinal} >= total_step={self.total_step}")
        check_int("init_r", self.init_r, 1)
        check_int("target_r", self.target_r, 1)
        check_int("deltaT", self.deltaT, 1)
        # lora_alpha and lora_dropout follow LoRA's rules.
        check_bypass_options(self.init_r, self.lora_alpha, self.lora_dropout)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r must be <= init_r (the budget only shrinks), got "
                             f"target_r={self.target_r} > init_r={self.init_r}")
        check_number("beta1", self.beta1, 0, 1, high_open=True, why=" (an EMA factor)")
        check_number("beta2", self.beta2, 0, 1, high_open=True, why=" (an EMA factor)")
        check_number("orth_reg_weight", self.orth_reg_weight, 0)
        check_target_modules(self.target_modules)


# ----------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """{full name: SVDLinear} for every AdaLoRA layer in the model, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}


def add_adalora(model: nn.Module, config: AdaLoraConfig) -> nn.Module:
    """Wrap every target of `config` in an SVDLinear of rank init_r (in place), freeze everything else;
    returns `model`, as `add_lora` does.

    All new layers are built before any is put in, so a bad rank for one layer leaves the model untouched.
    Training also needs the allocator: `RankAllocator(model, config)`, called once per optimizer step.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"config must be a minilora.adalora.AdaLoraConfig, got {type(config).__name__}")
    wrap_modules(model, find_target_modules(model, config.target_modules),
                 lambda name, base: SVDLinear(base, r=config.init_r, lora_alpha=config.lora_alpha,
                                              lora_dropout=config.lora_dropout))
    return model


def orthogonal_penalty(model: nn.Module) -> torch.Tensor:
    """R = mean over all P's and Q's of ||Q Qᵀ − I||_F and ||Pᵀ P − I||_F.

    The paper's R(P, Q) (AdaLoRA, Eq. 4) squares these norms; the authors' code and peft use them plain,
    averaged over 2 × (number of SVDLinear layers) terms, and so do we (chapter 2 shows both). The training
    loss is task_loss + orth_reg_weight · R. Near R = 0 the rows of Q and the columns of P are orthonormal,
    so P Λ Q behaves like an SVD and |Λ_i| measures triplet i's size.
    """
    layers = svd_layers(model)
    if not layers:
        raise ValueError(f"orthogonal_penalty: {type(model).__name__} has no SVDLinear layers "
                         f"(did you call add_adalora?)")
    terms = []
    for layer in layers.values():
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # both (r, r)
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - identity, ord="fro"))
    return sum(terms) / len(terms)
