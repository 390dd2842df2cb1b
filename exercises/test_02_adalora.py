"""Exercise 2 (Chapter 2, AdaLoRA): tests for exercises/learner/adalora.py.

    .venv/bin/python -m pytest exercises/test_02_adalora.py                     # your stubs
    .venv/bin/python -m pytest exercises/test_02_adalora.py --impl=reference    # the book's solution

Work top to bottom: the schedule, the importance EMAs, the triplet score, the mask, and finally all of them
together on a real peft AdaLoRA model, where your rank pattern must equal peft's at every masking step.
"""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture
def adalora(implementation):
    return implementation("adalora")


# ----------------------------------------------------------------------------------------------------
# budget_schedule
# ----------------------------------------------------------------------------------------------------


def test_budget_schedule_three_phases(adalora):
    # 6 layers, init_r 6 -> 36 triplets, target_r 3 -> 18; warm-up to step 2, final from step 13 on.
    schedule = [adalora.budget_schedule(step, 36, 18, tinit=2, tfinal=3, total_step=16, deltaT=2)
                for step in range(17)]
    budgets = [budget for budget, _ in schedule]
    assert budgets == [36, 36, 36, 31, 27, 24, 22, 20, 19, 18, 18, 18, 18, 18, 18, 18, 18]
    masks = [mask for _, mask in schedule]
    assert masks[:4] == [False] * 4                            # warm-up, and step 3 is odd
    assert masks[4:13] == [True, False] * 4 + [True]           # every deltaT = 2 steps while decaying
    assert masks[14:] == [True] * 3                            # final phase: always
    assert all(isinstance(budget, int) for budget in budgets)


def test_budget_schedule_cubic_shape(adalora):
    # No warm-up or final phase, 100 steps: budget(t) = int(900 * (1 - t/100)^3 + 100).
    got = [adalora.budget_schedule(t, 1000, 100, 0, 0, 100, 1)[0] for t in (1, 10, 50, 90, 99)]
    assert got == [973, 756, 212, 100, 100]


# ----------------------------------------------------------------------------------------------------
# update_importance and triplet_score
# ----------------------------------------------------------------------------------------------------


def test_update_importance_two_steps(adalora):
    param = torch.tensor([1.0, -2.0, 0.0])
    grad = torch.tensor([0.5, 0.5, 3.0])
    ipt, unc = adalora.update_importance(param, grad, torch.zeros(3), torch.zeros(3), 0.85, 0.85)
    # I = |p * g| = [0.5, 1, 0];  Ī = 0.15 I;  Ū = 0.15 |I - Ī| (with the NEW Ī)
    torch.testing.assert_close(ipt, torch.tensor([0.075, 0.15, 0.0]))
    torch.testing.assert_close(unc, torch.tensor([0.06375, 0.1275, 0.0]))
    ipt, unc = adalora.update_importance(param, 2 * grad, ipt, unc, 0.5, 0.9)
    # I = [1, 2, 0];  Ī = 0.5 Ī + 0.5 I = [0.5375, 1.075, 0];  Ū = 0.9 Ū + 0.1 |I - Ī|
    torch.testing.assert_close(ipt, torch.tensor([0.5375, 1.075, 0.0]))
    torch.testing.assert_close(unc, torch.tensor([0.103625, 0.20725, 0.0]))


def test_triplet_score(adalora):
    score_A = torch.tensor([[1.0, 3.0], [0.0, 2.0]])              # (r=2, in=2): row means 2, 1
    score_E = torch.tensor([[10.0], [20.0]])                      # (r=2, 1)
    score_B = torch.tensor([[1.0, 0.0], [3.0, 4.0], [2.0, 2.0]])  # (out=3, r=2): column means 2, 2
    scores = adalora.triplet_score(score_A, score_E, score_B)
    assert scores.shape == (2,)
    assert scores.tolist() == [14.0, 23.0]


# ----------------------------------------------------------------------------------------------------
# mask_to_budget
# ----------------------------------------------------------------------------------------------------


def test_mask_to_budget_ranks_all_layers_together(adalora):
    scores = {"q": torch.tensor([0.9, 0.1, 0.5]), "v": torch.tensor([0.2, 0.8, 0.3])}
    keep = adalora.mask_to_budget(scores, budget=3)
    assert keep["q"].tolist() == [True, False, True]
    assert keep["v"].tolist() == [False, True, False]
    keep = adalora.mask_to_budget({"q": torch.tensor([0.9, 0.8]), "v": torch.tensor([0.1, 0.2])}, budget=2)
    assert keep["q"].tolist() == [True, True] and keep["v"].tolist() == [False, False]   # v loses everything


def test_mask_to_budget_ties_and_full_budget(adalora):
    keep = adalora.mask_to_budget({"q": torch.tensor([1.0, 1.0, 2.0])}, budget=2)
    assert keep["q"].tolist() == [False, False, True]     # both tied scores sit at the threshold: both go
    keep = adalora.mask_to_budget({"q": torch.tensor([3.0, 1.0]), "v": torch.tensor([2.0])}, budget=3)
    assert keep["q"].tolist() == [True, True] and keep["v"].tolist() == [True]   # nothing to drop
    assert keep["q"].dtype == torch.bool


# ----------------------------------------------------------------------------------------------------
# All together, against peft
# ----------------------------------------------------------------------------------------------------


def test_your_allocator_steps_reproduce_peft_rank_pattern(adalora):
    import peft

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    schedule = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(LlamaForCausalLM(config), peft.AdaLoraConfig(
            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **schedule))
    inner = model.base_model.model
    layers = [name for name, m in inner.named_modules() if hasattr(m, "lora_E") and name]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ipt, unc = {}, {}
    batches = torch.Generator().manual_seed(0)
    compared = 0
    for step in range(6):                                     # warm-up and decay: steps 0..5
        ids = torch.randint(0, 64, (4, 12), generator=batches)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        # Your EMAs, from the same parameters and gradients peft is about to use.
        for name in layers:
            for kind in ("lora_A", "lora_E", "lora_B"):
                p = getattr(inner.get_submodule(name), kind)["default"]
                key = (name, kind)
                ipt.setdefault(key, torch.zeros_like(p))
                unc.setdefault(key, torch.zeros_like(p))
                with torch.no_grad():
                    ipt[key], unc[key] = adalora.update_importance(p, p.grad, ipt[key], unc[key], 0.85, 0.85)
        budget, mask_now = adalora.budget_schedule(step, 16, 8, schedule["tinit"], schedule["tfinal"],
                                                   schedule["total_step"], schedule["deltaT"])
        model.base_model.update_and_allocate(step)
        if mask_now:
            scores = {name: adalora.triplet_score(*(ipt[(name, k)] * unc[(name, k)]
                                                    for k in ("lora_A", "lora_E", "lora_B")))
                      for name in layers}
            keep = adalora.mask_to_budget(scores, budget)
            theirs = model.peft_config["default"].rank_pattern
            assert {name: keep[name].tolist() for name in layers} == \
                {name: theirs[f"{name}.lora_E.default"] for name in layers}, step
            compared += 1
        optimizer.zero_grad()
    assert compared == 4
