"""minilora.adalora against peft's AdaLoRA: same weights, same data, same optimizer, same numbers.

The central test trains a tiny Llama with peft's AdaLoRA and an identical copy with minilora's, side by side,
through all three phases (warm-up, cubic decay, final) and asserts that the loss, the budget and every
module's rank pattern agree at every step — exactly, bit for bit, since both do the same float operations.
"""

import copy
import warnings

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minilora.adalora import (
    AdaLoraConfig,
    RankAllocator,
    SVDLinear,
    add_adalora,
    budget_schedule,
    mask_to_budget,
    orthogonal_penalty,
    svd_layers,
    triplet_score,
)
from minilora.lora import merge_lora

TARGETS = ("q_proj", "v_proj", "up_proj")
# 16 steps: warm-up 0..2, cubic decay 3..12 (masking on even steps), pattern fixed at 13, final 14..15.
SCHEDULE = dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2, total_step=16, lora_alpha=8,
                orth_reg_weight=0.5)
STEPS = 16


def build_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama, hidden 32 (q_proj 32->32, v_proj 32->16, up_proj 32->64), in training mode."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train()


def peft_adalora(base, **overrides):
    config = peft.AdaLoraConfig(target_modules=list(TARGETS), task_type="CAUSAL_LM",
                                **{**SCHEDULE, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, config)


def copy_peft_weights_into(ours, peft_model):
    """Give our SVDLinear layers the exact A, E, B peft drew at initialisation."""
    with torch.no_grad():
        for name, layer in svd_layers(ours).items():
            theirs = peft_model.base_model.model.get_submodule(name)
            for kind in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, kind).copy_(getattr(theirs, kind)["default"])


def peft_rank_pattern(peft_model):
    """peft's rank pattern with our keys ({module path: [bool]}), or None before its first masking."""
    pattern = peft_model.peft_config["default"].rank_pattern
    if pattern is None:
        return None
    return {key.removesuffix(".default").removesuffix(".lora_E"): value for key, value in pattern.items()}


def theirs_E(peft_model, name):
    return peft_model.base_model.model.get_submodule(name).lora_E["default"]


@pytest.fixture(scope="module")
def trained_pair():
    """Train peft and minilora side by side for STEPS steps; return both models and the per-step record."""
    base = build_llama(seed=0)
    ours = copy.deepcopy(base)
    peft_model = peft_adalora(base)
    config = AdaLoraConfig(target_modules=TARGETS, **SCHEDULE)
    allocator = RankAllocator(add_adalora(ours, config), config)
    copy_peft_weights_into(ours, peft_model)

    opt_peft = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    batches = torch.Generator().manual_seed(0)
    record = []
    for step in range(STEPS):
        ids = torch.randint(0, 64, (4, 12), generator=batches)
        loss_peft = peft_model(input_ids=ids, labels=ids).loss   # peft adds the orth. penalty itself
        loss_peft.backward()
        opt_peft.step()
        peft_model.base_model.update_and_allocate(step)

        task_loss = ours(input_ids=ids, labels=ids).loss
        loss_ours = task_loss + SCHEDULE["orth_reg_weight"] * orthogonal_penalty(ours)
        loss_ours.backward()
        opt_ours.step()
        budget = allocator.update_and_allocate(step)

        record.append(dict(
            step=step, loss_peft=loss_peft.item(), loss_ours=loss_ours.item(), budget_ours=budget,
            budget_peft=peft_model.base_model.rankallocator.budget_schedule(step)[0],
            pattern_peft=peft_rank_pattern(peft_model), pattern_ours=allocator.rank_pattern,
            E_equal=all(torch.equal(layer.lora_E, theirs_E(peft_model, name))
                        for name, layer in svd_layers(ours).items())))
        opt_peft.zero_grad()
        opt_ours.zero_grad()
    return dict(peft=peft_model, ours=ours, allocator=allocator, record=record)


# ----------------------------------------------------------------------------------------------------
# Step for step
# ----------------------------------------------------------------------------------------------------


def test_training_matches_peft_step_for_step(trained_pair):
    record = trained_pair["record"]
    for row in record:
        assert row["loss_ours"] == row["loss_peft"], row["step"]
        assert row["budget_ours"] == row["budget_peft"], row["step"]
        if row["pattern_peft"] is None:        # peft has not masked yet: we keep every triplet
            assert all(all(keep) for keep in row["pattern_ours"].values()), row["step"]
        else:
            assert row["pattern_ours"] == row["pattern_peft"], row["step"]
        assert row["E_equal"], row["step"]
    # The run really went through all three phases and really moved ranks between modules.
    budgets = [row["budget_ours"] for row in record]
    assert budgets[:3] == [36, 36, 36]                    # warm-up: 6 modules x init_r 6
    assert budgets[3] < 36 and budgets == sorted(budgets, reverse=True)
    assert budgets[-4:] == [18, 18, 18, 18]               # target: 6 modules x target_r 3
    final_ranks = [sum(keep) for keep in record[-1]["pattern_ours"].values()]
    assert sum(final_ranks) == 18 and max(final_ranks) > 3 and min(final_ranks) < 3
    assert record[-1]["loss_ours"] < record[0]["loss_ours"] - 0.5


def test_final_phase_fixes_the_pattern(trained_pair):
    allocator, record = trained_pair["allocator"], trained_pair["record"]
    assert allocator.pattern_fixed
    final_start = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    for row in record[final_start:]:
        assert row["pattern_ours"] == record[final_start]["pattern_ours"]
    for name, layer in svd_layers(trained_pair["ours"]).items():   # masked triplets are zero in Λ
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0), name


def test_rank_grid_is_layers_by_module_kind(trained_pair):
    allocator = trained_pair["allocator"]
    layers, kinds, grid = allocator.rank_grid()
    assert layers == [0, 1] and kinds == ["q_proj", "v_proj", "up_proj"]
    ranks = allocator.ranks
    assert grid == [[ranks[f"model.layers.{i}.self_attn.q_proj"], ranks[f"model.layers.{i}.self_attn.v_proj"],
                     ranks[f"model.layers.{i}.mlp.up_proj"]] for i in (0, 1)]


def test_orthogonal_penalty_equals_peft_term(trained_pair):
    peft_model, ours = trained_pair["peft"], trained_pair["ours"]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with_penalty = peft_model(input_ids=ids, labels=ids).loss
        task_only = peft_model.base_model.model(input_ids=ids, labels=ids).loss   # skips AdaLoraModel.forward
        ours_penalty = orthogonal_penalty(ours)
    assert ours_penalty.item() > 0.1
    peft_term = (with_penalty - task_only) / SCHEDULE["orth_reg_weight"]
    torch.testing.assert_close(ours_penalty, peft_term, rtol=1e-5, atol=1e-6)


def test_merge_equals_peft_merge(trained_pair):
    peft_model, ours = copy.deepcopy(trained_pair["peft"]), copy.deepcopy(trained_pair["ours"])
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(6))
    ours.eval()
    peft_model.eval()
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
        layer.merge()
        torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        merged_ours = merge_lora(ours, dtype=torch.float32)
        merged_peft = peft_model.merge_and_unload()
        for name in svd_layers(trained_pair["ours"]):
            torch.testing.assert_close(merged_ours.get_submodule(name).weight,
                                       merged_peft.get_submodule(name).weight, rtol=0, atol=1e-7)
        torch.testing.assert_close(merged_ours(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------


def test_svdlinear_init_forward_and_shapes():
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 6)
    layer = SVDLinear(base, r=4, lora_alpha=16)
    assert layer.lora_A.shape == (4, 10) and layer.lora_E.shape == (4, 1) and layer.lora_B.shape == (6, 4)
    assert torch.all(layer.lora_E == 0) and layer.scaling == 16 and layer.ranknum.item() == 4
    assert 0.01 < layer.lora_A.std().item() < 0.03 and 0.01 < layer.lora_B.std().item() < 0.03
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)          # Λ = 0: model unchanged
    with torch.no_grad():
        layer.lora_E.normal_()
    expected = base(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    manual = 16 / (4 + 1e-5) * layer.lora_B @ torch.diag(layer.lora_E.view(-1)) @ layer.lora_A
    torch.testing.assert_close(layer.delta_weight(), manual, rtol=1e-5, atol=1e-7)
    assert not base.weight.requires_grad


def test_keep_triplets_to_rank_zero_keeps_the_output():
    torch.manual_seed(0)
    layer = SVDLinear(torch.nn.Linear(8, 8), r=4)
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([[0.0], [1.5], [0.0], [-2.0]]))
    x = torch.randn(2, 8)
    before = layer(x)
    layer.keep_triplets(torch.tensor([False, True, False, True]))
    assert layer.r == 2 and layer.lora_A.shape == (2, 8) and layer.ranknum.item() == 4
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
    layer.keep_triplets(torch.tensor([False, False]))
    assert layer.r == 0 and layer.lora_B.shape == (8, 0)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# The allocator's pieces
# ----------------------------------------------------------------------------------------------------


def test_budget_schedule_matches_peft_on_every_step():
    for tinit, tfinal, deltaT in [(0, 0, 1), (3, 5, 3), (10, 2, 1)]:
        kwargs = dict(SCHEDULE, tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=40)
        peft_model = peft_adalora(build_llama(), **kwargs)
        theirs = peft_model.base_model.rankallocator
        for step in range(45):
            ours = budget_schedule(step, 36, 18, tinit, tfinal, 40, deltaT)
            assert ours == theirs.budget_schedule(step), (tinit, tfinal, deltaT, step)


def test_mask_to_budget_keeps_the_best_globally_and_drops_ties():
    scores = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.2, 0.8, 0.3])}
    keep = mask_to_budget(scores, budget=3)
    assert keep["a"].tolist() == [True, False, True] and keep["b"].tolist() == [False, True, False]
    keep = mask_to_budget({"a": torch.tensor([1.0, 1.0, 2.0])}, budget=2)   # a tie at the threshold:
    assert keep["a"].tolist() == [False, False, True]                      # both go
    keep = mask_to_budget(scores, budget=6)                                    # nothing to drop: no crash
    assert all(all(k.tolist()) for k in keep.values())


def test_triplet_score_is_E_plus_row_and_column_means():
    score_A = torch.tensor([[1.0, 3.0], [0.0, 2.0]])            # (r=2, in=2)
    score_E = torch.tensor([[10.0], [20.0]])
    score_B = torch.tensor([[1.0, 0.0], [3.0, 4.0], [2.0, 2.0]])  # (out=3, r=2)
    assert triplet_score(score_A, score_E, score_B).tolist() == [10.0 + 2.0 + 2.0, 20.0 + 1.0 + 2.0]


def test_init_r_equal_target_r_trains_without_masking():
    model = build_llama()
    config = AdaLoraConfig(init_r=4, target_r=4, total_step=4, tfinal=1)
    allocator = RankAllocator(add_adalora(model, config), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        assert allocator.update_and_allocate(step) == 16
        optimizer.zero_grad()
    assert all(rank == 4 for rank in allocator.ranks.values())
    assert all(torch.all(layer.lora_E != 0) for layer in svd_layers(model).values())


# ----------------------------------------------------------------------------------------------------
# Forgetting the allocation step (peft #1801) and other misuse
# ----------------------------------------------------------------------------------------------------


def _one_step(model, optimizer, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_warns_when_update_and_allocate_is_forgotten():
    model = build_llama()
    config = AdaLoraConfig(total_step=10, target_r=4, init_r=6)
    allocator = RankAllocator(add_adalora(model, config), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the correct loop never warns
        for step in range(2):
            _one_step(model, optimizer, ids)
            allocator.update_and_allocate(step)
            optimizer.zero_grad()
    _one_step(model, optimizer, ids)            # step 2: the call is forgotten ...
    optimizer.zero_grad()
    with pytest.warns(UserWarning, match="update_and_allocate"):
        loss = model(input_ids=ids, labels=ids).loss   # ... and the next training forward notices
    loss.backward()
    optimizer.step()
    with pytest.warns(UserWarning, match=r"step=3\) follows step=1"):
        allocator.update_and_allocate(3)


def test_no_warning_for_eval_forwards_or_gradient_accumulation():
    model = build_llama()
    config = AdaLoraConfig(total_step=10, target_r=4, init_r=6)
    allocator = RankAllocator(add_adalora(model, config), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            for _ in range(3):                  # three micro-batches per optimizer step
                model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            allocator.update_and_allocate(step)
            optimizer.zero_grad()
        _one_step(model, optimizer, ids)        # forgotten, but only eval forwards follow
        with torch.no_grad():
            model(input_ids=ids)


def test_update_and_allocate_without_gradients_is_a_clear_error():
    model = build_llama()
    config = AdaLoraConfig(total_step=10)
    allocator = RankAllocator(add_adalora(model, config), config)
    with pytest.raises(RuntimeError, match="no gradient.*before optimizer.zero_grad"):
        allocator.update_and_allocate(0)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        allocator.update_and_allocate(-1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "total_step must be an integer >= 1"),
    (dict(total_step=0), "total_step must be an integer >= 1"),
    (dict(total_step=10, tinit=5, tfinal=5), r"tinit \+ tfinal must be < total_step"),
    (dict(total_step=10, init_r=4, target_r=8), "target_r must be <= init_r"),
    (dict(total_step=10, target_r=0), "target_r must be an integer >= 1"),
    (dict(total_step=10, init_r=0), "init_r must be an integer >= 1"),
    (dict(total_step=10, deltaT=0), "deltaT must be an integer >= 1"),
    (dict(total_step=10, beta1=1.0), r"beta1 must be a number in \[0, 1\) \(an EMA factor\)"),
    (dict(total_step=10, beta2=-0.1), r"beta2 must be a number in \[0, 1\) \(an EMA factor\)"),
    (dict(total_step=10, orth_reg_weight=-1), r"orth_reg_weight must be a number in \[0, ∞\)"),
    (dict(total_step=10, lora_alpha=0), r"lora_alpha must be a number in \(0, ∞\)"),
    (dict(total_step=10, lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\) \(a probability\)"),
    (dict(total_step=10, target_modules=[]), "target_modules must be a non-empty"),
])
def test_config_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**kwargs)


def test_bad_targets_and_missing_layers():
    with pytest.raises(ValueError, match="matched no module"):
        add_adalora(build_llama(), AdaLoraConfig(total_step=10, target_modules=("nope",)))
    with pytest.warns(UserWarning, match="rank larger than their weight allows"):   # accepted, as LoRA's r
        add_adalora(build_llama(), AdaLoraConfig(total_step=10, init_r=20, target_r=2))
    with pytest.raises(ValueError, match="no SVDLinear layers"):
        orthogonal_penalty(build_llama())
    with pytest.raises(ValueError, match="no SVDLinear layers"):
        RankAllocator(build_llama(), AdaLoraConfig(total_step=10))


# ----------------------------------------------------------------------------------------------------
# Adapter files in peft's format, both directions
# ----------------------------------------------------------------------------------------------------


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_minilora_adapter_loads_in_peft(trained_pair, tmp_path):
    import json

    from safetensors.torch import load_file

    from minilora.adapters import save_adapter

    ours, allocator = trained_pair["ours"], trained_pair["allocator"]
    save_adapter(ours, tmp_path, allocator.config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA"
    assert saved["rank_pattern"] == {f"{name}.lora_E": keep for name, keep in allocator.rank_pattern.items()}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    ranks = allocator.ranks
    assert 0 in ranks.values()                                   # the run pruned a module to rank 0
    for name, rank in ranks.items():
        assert tensors[f"base_model.model.{name}.lora_A"].shape[0] == rank
        assert tensors[f"base_model.model.{name}.lora_E"].shape == (rank, 1)
        assert tensors[f"base_model.model.{name}.lora_B"].shape[1] == rank
    assert not any(key.endswith(".weight") for key in tensors)

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build_llama(seed=0), tmp_path)
    torch.testing.assert_close(_logits(theirs, ids), _logits(copy.deepcopy(ours), ids), rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_minilora(trained_pair, tmp_path):
    from minilora.adapters import load_adapter

    peft_model = copy.deepcopy(trained_pair["peft"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path)
    loaded = load_adapter(build_llama(seed=0), tmp_path)
    layers = svd_layers(loaded)
    assert {name: layer.r for name, layer in layers.items()} == trained_pair["allocator"].ranks
    assert min(layer.r for layer in layers.values()) == 0         # a rank-0 module loads
    assert all(layer.ranknum.item() == SCHEDULE["init_r"] for layer in layers.values())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(_logits(loaded, ids), _logits(peft_model, ids), rtol=1e-5, atol=1e-5)


def test_adapter_type_must_match_the_layers(trained_pair, tmp_path):
    from minilora.adapters import load_adapter, save_adapter
    from minilora.lora import LoraConfig, add_lora

    ours = trained_pair["ours"]
    with pytest.raises(ValueError, match="no LoRA layers with adapter 'default' .*need an AdaLoraConfig"):
        save_adapter(ours, tmp_path, LoraConfig())
    save_adapter(ours, tmp_path, trained_pair["allocator"].config)
    with pytest.raises(ValueError, match="cannot load into a model with LoRA layers"):
        load_adapter(add_lora(build_llama(), LoraConfig(target_modules=TARGETS)), tmp_path)
    model = load_adapter(build_llama(), tmp_path)
    with pytest.raises(ValueError, match="does not fit"):          # its layers are pruned now
        load_adapter(model, tmp_path)


# ----------------------------------------------------------------------------------------------------
# The allocator owns its state; SVDLinear is not a LoRALinear (issue 13)
# ----------------------------------------------------------------------------------------------------


def test_svd_layers_are_not_lora_layers():
    from minilora.lora import LoRALinear, lora_layers

    model = add_adalora(build_llama(), AdaLoraConfig(total_step=10, init_r=6, target_r=4))
    assert svd_layers(model) and not lora_layers(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_allocator_state_dict_round_trip(trained_pair):
    allocator = trained_pair["allocator"]
    state = allocator.state_dict()
    other = RankAllocator(copy.deepcopy(trained_pair["ours"]), allocator.config)
    other.load_state_dict(state)
    assert other.rank_pattern == allocator.rank_pattern
    assert (other.budget, other.updates, other.pattern_fixed, other.last_step) == \
        (allocator.budget, allocator.updates, allocator.pattern_fixed, allocator.last_step)
    assert other.exp_avg_ipt.keys() == allocator.exp_avg_ipt.keys()
    assert all(torch.equal(other.exp_avg_ipt[k], allocator.exp_avg_ipt[k]) for k in allocator.exp_avg_ipt)
    with pytest.raises(ValueError, match="saved layers differ"):
        other.load_state_dict(dict(state, rank_masks={}))
