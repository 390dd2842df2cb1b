"""Exercise 2: the heart of AdaLoRA's rank allocator (Chapter 2, chapters/02-adalora.md).

This is minilora/core/adalora.py with the bodies of the allocator's four steps taken out. Fill in every body
that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_02_adalora.py            # against this file

until everything passes. The book's solution is minilora/core/adalora.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write the four steps the allocator repeats after every optimizer step:
    budget_schedule     how many triplets may survive at this step (the cubic schedule)
    update_importance   the EMA of sensitivity |p ⊙ ∇p| and of its uncertainty
    triplet_score       one importance number per triplet (P column, Λ value, Q row)
    mask_to_budget      keep the best `budget` triplets over all layers, drop the rest
Given (imported from the core, not part of the exercise): AdaLoraConfig, SVDLinear, orthogonal_penalty and
RankAllocator. The tests also run your functions on a peft AdaLoRA model and compare with peft's rank pattern.
"""

from __future__ import annotations

import torch

from minilora.core.adalora import (  # noqa: F401  (given)
    INIT_STD,
    KINDS,
    AdaLoraConfig,
    RankAllocator,
    SVDLinear,
    orthogonal_penalty,
)


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:
    """(budget, mask_now) at `step`: warm-up, cubic decay, final phase."""
    raise NotImplementedError(
        "hint: three phases (warm-up, cubic decay, final); mask only every deltaT steps during the decay. "
        "Chapter 2 §5 has the formula and a worked example.")


def update_importance(param: torch.Tensor, grad: torch.Tensor, exp_avg_ipt: torch.Tensor,
                      exp_avg_unc: torch.Tensor, beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the new (exp_avg_ipt, exp_avg_unc) after one step of the two EMAs."""
    raise NotImplementedError(
        "hint: sensitivity I = |param * grad|, then the two EMAs; the uncertainty uses the NEW smoothed "
        "value. Keep the formula's order of operations to match peft bit for bit.")


def triplet_score(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """Importance of each triplet, shape (r,), from element scores of A (r, in), E (r, 1), B (out, r)."""
    raise NotImplementedError(
        "hint: triplet i = Λ_i, row i of A (= Q), column i of B (= P). Sum or mean over the vectors?")


def mask_to_budget(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """{name: bool tensor (r,)}: True for the triplets that survive, ranked over all layers together."""
    raise NotImplementedError(
        "hint: rank all layers' triplets together; how many must go? torch.kthvalue finds the threshold; "
        "ties at the threshold go together. What if nothing has to go?")
