"""minilora.frozen_linear: the same forward as the base layer, the same input gradient up to summation order,
and the shortcut taken only where it is safe (a frozen plain nn.Linear, no hooks, something to differentiate)."""

import collections

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


# ----------------------------------------------------------------------------------------------------
# A whole LoRA step beside peft's: the same work, op for op (issue 21: on AVX512-BF16 CPUs our LoRA step was
# measured 1.26x peft's; the ops below say it cannot be the work itself)
# ----------------------------------------------------------------------------------------------------

# Ops that only describe a tensor (views, aliases) or cast without arithmetic are left out: peft transposes with
# `t`, we with `.T` (`permute`), the same strides either way; every op that reads or writes numbers is kept.
VIEW_OPS = {"t", "permute", "transpose", "view", "_unsafe_view", "reshape", "expand", "as_strided", "alias",
            "detach", "unsqueeze", "squeeze", "slice", "select", "split", "unbind", "_reshape_alias"}


def _step_ops(model, ids) -> collections.Counter:
    """(op, shapes, strides, dtypes) of every non-view ATen op one LoRA training step dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = collections.Counter()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in VIEW_OPS:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                ops[(name, *((tuple(t.shape), t.stride(), t.dtype) for t in tensors))] += 1
            return func(*args, **(kwargs or {}))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=False)
    with Record():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return ops


def _lora_and_peft_step_ops(tiny_llama, token_ids, lora_alpha):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from minilora.lora import LoraConfig, add_lora

    ours = add_lora(tiny_llama(seed=0).to(torch.bfloat16).train(),
                    LoraConfig(r=4, lora_alpha=lora_alpha, target_modules="all-linear"))
    theirs = get_peft_model(tiny_llama(seed=0).to(torch.bfloat16).train(),
                            PeftLoraConfig(r=4, lora_alpha=lora_alpha, target_modules="all-linear"))
    ours_ops, theirs_ops = _step_ops(ours, token_ids), _step_ops(theirs, token_ids)
    return ours_ops - theirs_ops, theirs_ops - ours_ops


@pytest.mark.parametrize("slow_layout", [False, True], ids=["native-bf16-cpu", "cpu-without-bf16"])
def test_a_lora_step_does_the_work_of_peft_s(tiny_llama, token_ids, monkeypatch, slow_layout):
    """A bf16 Llama with LoRA on every linear layer, one step, α/r = 1.5: minilora and peft dispatch the same ops
    on the same shapes, strides and dtypes, except where `frozen_linear` computes a frozen base's input gradient
    in the other layout (CPUs without native bf16 matmuls): there our `mm(G, W)` becomes a transposed copy of W
    and a `mm(G, W^T contiguous)`. The layout rule is forced both ways, so every CPU checks both cases."""
    monkeypatch.setattr("minilora.frozen_linear.plain_layout_is_slow", lambda weight: slow_layout)
    only_ours, only_theirs = _lora_and_peft_step_ops(tiny_llama, token_ids, lora_alpha=6)
    if not slow_layout:
        assert only_ours == only_theirs == {}
        return
    # 14 frozen bases (2 layers x 7 linears) of which 3 need no input gradient (q, k, v of the first layer read
    # the embeddings, which do not train): 11 products change layout, each with one transposed copy of W.
    assert sum(only_theirs.values()) == 11 and {key[0] for key in only_theirs} == {"mm"}
    assert sum(n for key, n in only_ours.items() if key[0] == "mm") == 11
    assert sum(n for key, n in only_ours.items() if key[0] == "clone") == 11  # W^T made contiguous
    assert {key[0] for key in only_ours} == {"mm", "clone"}


def test_a_lora_step_scales_r_numbers_where_peft_scales_out_features(tiny_llama, token_ids, monkeypatch):
    """α/r = 2 (peft's default α = 8 at r = 4), a power of two: minilora.lora applies it to x Aᵀ, r = 4 numbers
    per token, where peft scales the layer's output; the same number of multiplies (14 forward, 14 backward),
    each r wide instead of 16 to 64, and nothing else differs."""
    monkeypatch.setattr("minilora.frozen_linear.plain_layout_is_slow", lambda weight: False)
    only_ours, only_theirs = _lora_and_peft_step_ops(tiny_llama, token_ids, lora_alpha=8)
    assert {key[0] for key in only_ours} == {key[0] for key in only_theirs} == {"mul"}
    assert sum(only_ours.values()) == sum(only_theirs.values()) == 28
    assert all(key[1][0][-1] == 4 for key in only_ours)  # (batch, tokens, r)
    assert all(key[1][0][-1] in (16, 32, 64) for key in only_theirs)  # (batch, tokens, out_features)
