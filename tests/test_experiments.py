"""The chapters' experiments (minilora.experiments): the pieces that decide what they measure."""

import torch

from minilora import data, experiments
from minilora.architecture import lora_parameter_count


def test_split_by_first_letter_separates_the_two_halves():
    early = experiments.split_by_first_letter("finetune", 400, seed=5, first_half=True)
    late = experiments.split_by_first_letter("finetune", 400, seed=5, first_half=False)
    half = data.FIRST_LETTER_ID + len(data.LETTERS) // 2
    assert len(early) + len(late) == 400
    assert bool((early.input_ids[:, 1] < half).all()) and bool((late.input_ids[:, 1] >= half).all())


def test_kl_is_zero_for_the_same_model_and_positive_after_quantizing():
    model = data.pretrained_tiny_llama()
    inputs = data.make_task("pretrain", 16, seed=0).input_ids
    assert experiments.token_kl(model, model, inputs).abs().max().item() == 0.0
    quantized = experiments.quantize_model(experiments._copy(model), double_quant=False, quant_type="int4",
                                           compute_dtype=torch.float32)
    assert experiments.token_kl(model, quantized, inputs).min().item() > 0


def test_prepare_trains_exactly_the_adapter():
    for method, r in [("lora", 2), ("qlora", 4)]:
        model = experiments.prepare(method, r)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == lora_parameter_count("tiny-llama", r)  # the memory model's count of the same thing
    full = experiments.prepare("full", None)
    assert all(p.requires_grad for p in full.parameters())
