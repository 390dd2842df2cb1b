"""Exercise 5 (Chapter 5, paged optimizers): tests for exercises/learner/paged.py.

    .venv/bin/python -m pytest exercises/test_05_paged.py                     # your stubs
    .venv/bin/python -m pytest exercises/test_05_paged.py --impl=reference    # the book's solution

The first four tests are about the AdamW update of one page, the last four about LRU eviction.
"""

import pytest
import torch


@pytest.fixture
def paged(implementation):
    return implementation("paged")


def random_page(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


def test_update_page_first_step_moves_by_lr_times_sign(paged):
    # t = 1 with zero state: m̂ = g and v̂ = g², so the step is lr·g/(|g| + ε) ≈ lr·sign(g)
    param, grad = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, -4.0, 1e-3])
    exp_avg, exp_avg_sq = torch.zeros(3), torch.zeros(3)
    paged.adamw_update_page(param, grad, exp_avg, exp_avg_sq, 1, 0.1, 0.9, 0.999, 1e-8, 0.5)
    expected = torch.tensor([0.95 - 0.1, -1.9 + 0.1, 2.85 - 0.1])  # θ(1 − lr·λ) − lr·sign(g)
    torch.testing.assert_close(param, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(exp_avg, 0.1 * grad)
    torch.testing.assert_close(exp_avg_sq, 0.001 * grad**2)


def test_update_page_matches_torch_adamw_for_ten_steps(paged):
    param, _ = random_page()
    reference = param.clone().requires_grad_()
    torch_adamw = torch.optim.AdamW([reference], lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2,
                                    foreach=False)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for t in range(1, 11):
        _, grad = random_page(seed=t)
        reference.grad = grad.clone()
        torch_adamw.step()
        paged.adamw_update_page(param, grad, exp_avg, exp_avg_sq, t, 3e-2, 0.8, 0.95, 1e-6, 0.2)
    torch.testing.assert_close(param, reference.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(exp_avg, torch_adamw.state[reference]["exp_avg"], atol=1e-7, rtol=0)


def test_weight_decay_is_decoupled_not_l2(paged):
    # Adam + L2 adds λθ to the gradient, where the 1/√v normalisation shrinks it; AdamW decays θ directly.
    param = torch.tensor([10.0])
    paged.adamw_update_page(param, torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), 1, 0.1, 0.9, 0.999,
                            1e-8, 0.5)
    assert param.item() == pytest.approx(10.0 * (1 - 0.1 * 0.5))  # zero gradient: only the decay acts


def test_update_page_slice_by_slice_equals_whole(paged):
    # AdamW is elementwise: updating a tensor in two pages gives exactly what one update of it gives
    whole, grad = random_page(n=40)
    halves = whole.clone()
    state_whole = torch.zeros(40), torch.zeros(40)
    state_halves = torch.zeros(40), torch.zeros(40)
    for t in (1, 2, 3):
        paged.adamw_update_page(whole, grad, *state_whole, t, 1e-2, 0.9, 0.999, 1e-8, 0.1)
        for part in (slice(0, 17), slice(17, 40)):
            paged.adamw_update_page(halves[part], grad[part], state_halves[0][part], state_halves[1][part],
                                    t, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    assert not torch.equal(whole, random_page(n=40)[0])  # it moved
    assert torch.equal(whole, halves)


def test_lru_fills_free_slots_first(paged):
    pool = paged.LRUPool(3)
    assert [pool.admit(page) for page in "abc"] == [(0, None), (1, None), (2, None)]
    assert list(pool.slot_of) == ["a", "b", "c"] and pool.num_slots == 3
    with pytest.raises(ValueError):
        pool.admit("b")  # already resident


def test_lru_evicts_the_least_recently_used(paged):
    pool = paged.LRUPool(3)
    for page in "abc":
        pool.admit(page)
    pool.touch("a")  # order: b c a
    assert pool.victim() == "b"
    assert pool.admit("d") == (1, "b")  # d takes b's slot; order: c a d
    pool.touch("c")  # order: a d c
    assert pool.admit("e") == (0, "a")
    assert list(pool.slot_of.items()) == [("d", 1), ("c", 2), ("e", 0)]


def test_lru_never_evicts_a_pinned_page(paged):
    pool = paged.LRUPool(2)
    pool.admit(0)
    pool.admit(1)
    assert pool.admit(2, pinned={0}) == (1, 1)  # 0 is older but pinned
    with pytest.raises(RuntimeError):
        pool.admit(3, pinned={0, 2})


def test_lru_unbounded_pool_never_evicts(paged):
    pool = paged.LRUPool(None)
    results = [pool.admit(page) for page in range(50)]
    assert results == [(page, None) for page in range(50)]
    assert len(pool) == 50
