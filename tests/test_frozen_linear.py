"""minilora.frozen_linear: the same forward as the base layer, the same input gradient up to summation order,
and the shortcut taken only where it is safe (a frozen plain nn.Linear, no hooks, something to differentiate)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilora.frozen_linear import FrozenLinearFunction, frozen_linear, input_gradient, plain_layout_is_slow
from minilora.lora import LoRALinear

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def frozen_base(dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(96, 40, bias=bias).to(dtype)
    base.requires_grad_(False)
    return base


def grads(fn, x, grad_output):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(grad_output)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_forward_and_same_input_gradient_as_autograd(dtype):
    base = frozen_base(dtype)
    x = torch.randn(3, 7, 96).to(dtype)
    g = torch.randn(3, 7, 40).to(dtype)
    y, gx = grads(lambda t: frozen_linear(base, t), x, g)
    y_ref, gx_ref = grads(base, x, g)
    assert torch.equal(y, y_ref)  # the forward is F.linear either way: the same bits
    if not plain_layout_is_slow(base.weight):
        assert torch.equal(gx, gx_ref)  # the same op as autograd's
        return
    # The other layout sums the same float32 products in another order and rounds once to bf16/fp16, so
    # the two differ by at most one step of the output format near each value (2^-8 relative in bf16,
    # 2^-11 in fp16), plus float32 reordering error where the sum cancels (~96 terms · 2^-24 · Σ|terms|).
    step = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    scale = (g.float().abs().reshape(-1, 40) @ base.weight.float().abs()).max()
    diff = (gx.float() - gx_ref.float()).abs()
    assert bool((diff <= step * gx_ref.float().abs() + 1e-5 * scale).all())
    assert float((gx == gx_ref).float().mean()) > 0.9  # mostly the very same bits


def test_input_gradient_in_float32_is_autograds_own_op():
    w, g = torch.randn(40, 96), torch.randn(5, 40)
    assert torch.equal(input_gradient(g, w), g @ w)
    torch.testing.assert_close(input_gradient(g, w), F.linear(g, w.t().contiguous()))  # the other layout


def test_the_layout_rule():
    cpu_native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    for dtype in (torch.bfloat16, torch.float16):
        assert plain_layout_is_slow(torch.ones(2, 2, dtype=dtype)) == (not cpu_native_bf16)
    for dtype in (torch.float32, torch.float64):   # float64 measured faster in the plain layout (9.9 vs 15 ms)
        assert not plain_layout_is_slow(torch.ones(2, 2, dtype=dtype))


def backward_name(base, x) -> str:
    return type(frozen_linear(base, x).grad_fn).__name__


def test_the_shortcut_is_taken_only_where_it_is_safe():
    if not plain_layout_is_slow(torch.ones(1, dtype=torch.bfloat16)):
        pytest.skip("this CPU multiplies bf16 natively: frozen_linear is always base(x) here")
    base = frozen_base(torch.bfloat16)
    x = torch.randn(4, 96, dtype=torch.bfloat16, requires_grad=True)
    ours = FrozenLinearFunction.__name__ + "Backward"
    assert backward_name(base, x) == ours
    with torch.no_grad():
        assert frozen_linear(base, x).grad_fn is None
    assert frozen_linear(base, x.detach()).grad_fn is None  # nothing needs a gradient
    base.bias.requires_grad_(True)  # a trained bias (LoraConfig(bias="all")) needs autograd's own backward
    assert backward_name(base, x) != ours
    frozen_linear(base, x).sum().backward()
    assert base.bias.grad is not None
    base.bias.requires_grad_(False)
    seen = []
    handle = base.register_forward_hook(lambda *args: seen.append(True))
    assert backward_name(base, x) != ours and seen == [True]  # hooks run: the layer's own call
    handle.remove()

    class Subclass(nn.Linear):
        pass
    other = Subclass(96, 40).to(torch.bfloat16).requires_grad_(False)
    assert backward_name(other, x) != ours  # another layer type: its own forward


def test_a_bf16_lora_layer_trains_the_same_adapter_gradients():
    """Through a LoRA layer the shortcut changes only ∂L/∂x; ∂L/∂A and ∂L/∂B are autograd's own."""
    base = frozen_base(torch.bfloat16, seed=3)
    layer = LoRALinear(base, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 96, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().pow(2).sum().backward()
    ours = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad()
    result = base(x.detach())  # the same bypass, with the base called plainly
    update = (x.detach().float() @ layer.lora_A.T) @ layer.lora_B.T * layer.scaling
    (result + update).to(torch.bfloat16).float().pow(2).sum().backward()
    assert torch.equal(ours[0], layer.lora_A.grad) and torch.equal(ours[1], layer.lora_B.grad)
