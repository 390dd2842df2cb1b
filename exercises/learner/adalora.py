"""Exercise 2: the heart of AdaLoRA's rank allocator (Chapter 2, chapters/02-adalora.md).

Fill in every body that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_02_adalora.py            # against this file

until everything passes. The book's solution is minilora/adalora.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write the four steps the allocator repeats after every optimizer step:
    budget_schedule     how many triplets may survive at this step (the cubic schedule)
    update_importance   the EMA of sensitivity |p ⊙ ∇p| and of its uncertainty
    triplet_score       one importance number per triplet (P column, Λ value, Q row)
    mask_to_budget      keep the best `budget` triplets over all layers, drop the rest
Given (not part of the exercise): SVDLinear, RankAllocator and orthogonal_penalty in minilora.adalora.
The tests also run your functions on a peft AdaLoRA model and compare with peft's own rank pattern.
"""

import torch  # noqa: F401


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:
    """(budget, mask_now) at `step`: warm-up, cubic decay, final phase."""
    raise NotImplementedError(
        "hint: three cases. step <= tinit: (init_budget, False). step > total_step - tfinal: "
        "(target_budget, True). Otherwise c = 1 - (step - tinit) / (total_step - tfinal - tinit) and "
        "budget = int((init_budget - target_budget) * c**3 + target_budget), masking only when "
        "step % deltaT == 0. Check: what is the budget one step after tinit, and at total_step - tfinal?")


def update_importance(param: torch.Tensor, grad: torch.Tensor, exp_avg_ipt: torch.Tensor,
                      exp_avg_unc: torch.Tensor, beta1: float,
                      beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the new (exp_avg_ipt, exp_avg_unc) after one step of the two EMAs."""
    raise NotImplementedError(
        "hint: sensitivity I = |param * grad| (elementwise). Smoothed: new_ipt = beta1 * exp_avg_ipt + "
        "(1 - beta1) * I. Uncertainty: new_unc = beta2 * exp_avg_unc + (1 - beta2) * |I - new_ipt| — with "
        "the NEW smoothed value. Write the products in exactly this order to match peft bit for bit.")


def triplet_score(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """Importance of each triplet, shape (r,), from element scores of A (r, in), E (r, 1), B (out, r)."""
    raise NotImplementedError(
        "hint: triplet i combines Λ_i, row i of A (= Q) and column i of B (= P): "
        "score_E.view(-1) + (mean of score_A over dim 1 + mean of score_B over dim 0). Means, not sums: a "
        "wide layer must not win just because its vectors are long.")


def mask_to_budget(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """{name: bool tensor (r,)}: True for the triplets that survive, ranked over all layers together."""
    raise NotImplementedError(
        "hint: concatenate all scores; n_drop = total - budget. If n_drop <= 0 keep everything (peft "
        "crashes here). Else threshold = torch.kthvalue(all_scores, n_drop).values, and a triplet survives "
        "iff its score > threshold (ties at the threshold are dropped together).")
