"""Exercise 1b (Chapter 1 §11, LoRA's family): tests for exercises/learner/family.py.

    .venv/bin/python -m pytest exercises/test_01_family.py                     # your stubs
    .venv/bin/python -m pytest exercises/test_01_family.py --impl=reference    # the book's solution

First rsLoRA's scale (hard numbers, then peft's `use_rslora`), then DoRA: the norm, the start, the formula,
and equality with peft's `use_dora=True` layer in outputs and gradients.
"""

import math

import peft
import pytest
import torch
from torch import nn


@pytest.fixture
def family(implementation):
    return implementation("family")


# ----------------------------------------------------------------------------------------------------
# rsLoRA
# ----------------------------------------------------------------------------------------------------


def test_rslora_scaling_hard_numbers(family):
    assert family.rslora_scaling(16, 4) == 8.0          # 16 / √4
    assert family.rslora_scaling(8, 1) == 8.0           # r = 1: the same as LoRA's α / r
    assert family.rslora_scaling(16, 64) == 2.0         # LoRA's α / r would give 0.25
    assert math.isclose(family.rslora_scaling(8, 2), 5.656854249492381, rel_tol=1e-12)   # 8 / √2


def test_rslora_scaling_equals_peft_use_rslora(family):
    for r in (1, 3, 8, 64):
        model = peft.get_peft_model(Proj(64, 64), peft.LoraConfig(r=r, lora_alpha=16, target_modules=["proj"],
                                                                  use_rslora=True))
        theirs = model.base_model.model.proj.scaling["default"]
        assert math.isclose(family.rslora_scaling(16, r), theirs, rel_tol=1e-12), (r, theirs)


@pytest.mark.parametrize("r", [0, -2, 2.5])
def test_rslora_scaling_refuses_a_bad_rank(family, r):
    with pytest.raises(ValueError, match=f"r={r}"):
        family.rslora_scaling(8, r)


# ----------------------------------------------------------------------------------------------------
# DoRA
# ----------------------------------------------------------------------------------------------------


class Proj(nn.Module):
    """One nn.Linear with a bias, named `proj`: the smallest model peft can wrap."""

    def __init__(self, d_in=12, d_out=7):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(d_in, d_out)


def trained_dora(family, lora_dropout=0.0):
    """A DoRALinear (r 3, α 6) over Proj's layer, with random A, B and m, as if trained for a while."""
    layer = family.DoRALinear(Proj().proj, r=3, lora_alpha=6, lora_dropout=lora_dropout)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in (layer.lora_A, layer.lora_B):
            param.copy_(torch.randn(param.shape, generator=generator))
        layer.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(7, generator=generator))
    return layer


def x_input(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(4))


def test_weight_norm_is_the_norm_of_each_row(family):
    layer = trained_dora(family)
    V = layer.base.weight + 2.0 * layer.lora_B @ layer.lora_A          # W0 + s B A, s = 6 / 3
    norm = layer.weight_norm()
    assert norm.shape == (7,)                                         # one length per output row
    # float32 sums of 12 squares of O(1) numbers: rounding differences stay below 1e-5 relative
    assert torch.allclose(norm, V.detach().norm(dim=1), rtol=1e-5, atol=0)


def test_weight_norm_has_no_gradient(family):
    layer = trained_dora(family)
    assert layer.lora_B.requires_grad
    assert not layer.weight_norm().requires_grad                      # a constant for backward (Sec. 4.3)


def test_starts_at_the_base_output(family):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = family.DoRALinear(base, r=3, lora_alpha=6)
    assert torch.allclose(layer.lora_magnitude_vector, base.weight.norm(dim=1), rtol=1e-6, atol=0)  # m = ‖W0‖
    x = x_input(2, 5, 12)
    with torch.no_grad():
        # m / ‖W0‖ = 1 and B = 0: the layer is W0 x + b, up to float32 rounding of one more product
        assert torch.allclose(layer(x), base(x), atol=1e-6, rtol=0)


def test_forward_formula(family):
    layer = trained_dora(family)
    x = x_input(4, 12)
    with torch.no_grad():
        V = layer.base.weight + 2.0 * layer.lora_B @ layer.lora_A
        expected = (x @ V.T) * (layer.lora_magnitude_vector / V.norm(dim=1)) + layer.base.bias   # bias not scaled
        # the layer computes the same in another order (a correction on W0 x): equal within float32 rounding
        assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merged_forward_is_the_base_alone(family):
    layer = trained_dora(family)
    x = x_input(4, 12)
    with torch.no_grad():
        before = layer(x)
        layer.merge()                                   # given: W0 <- m (W0 + s B A) / ‖W0 + s B A‖
        assert torch.equal(layer(x), layer.base(x))
        assert torch.allclose(layer(x), before, atol=1e-5, rtol=1e-5)


def peft_dora_pair(family, lora_dropout):
    """Our DoRALinear and peft's use_dora=True layer over the same nn.Linear (with a bias), same A, B and m."""
    ours = trained_dora(family, lora_dropout)
    config = peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=lora_dropout, target_modules=["proj"], use_dora=True)
    theirs = peft.get_peft_model(Proj(), config).base_model.model.proj
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    parameters = {"ours": (ours.lora_A, ours.lora_B, ours.lora_magnitude_vector),
                  "peft": (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                           theirs.lora_magnitude_vector["default"].weight)}
    return {"ours": ours, "peft": theirs}, parameters


@pytest.mark.parametrize("lora_dropout", [0.0, 0.3])
def test_outputs_and_gradients_equal_peft(family, lora_dropout):
    """In training mode; with dropout, peft applies one dropout mask to x for both W0 x and B A x."""
    layers, parameters = peft_dora_pair(family, lora_dropout)
    results = {}
    for who, layer in layers.items():
        layer.train()
        x = x_input(5, 12).requires_grad_(True)
        torch.manual_seed(7)                                   # the same dropout mask for both
        out = layer(x)
        out.pow(2).sum().backward()
        results[who] = (out, x.grad, *(p.grad for p in parameters[who]))
    # Tolerance: the same float32 arithmetic in possibly another order; values O(1-10), so 1e-5 relative
    # (plus 1e-6 absolute for entries near zero) is far above rounding and far below any real difference.
    for what, ours, theirs in zip(("output", "grad x", "grad A", "grad B", "grad m"), results["ours"], results["peft"]):
        assert ours is not None, f"{what}: no gradient reached it"
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5), (what, (ours - theirs).abs().max())
    assert results["ours"][4].abs().max() > 1e-3                # m really is trained
