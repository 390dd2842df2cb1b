"""minilora.paged: PagedAdamW must compute exactly what torch.optim.AdamW computes, whatever the budget,
and its page traffic must be what the LRU policy predicts, page for page."""

import copy
import warnings

import pytest
import torch

from minilora.paged import LRUPool, PagedAdamW, adamw_state_bytes, adamw_update_page

PAGE = 64  # bytes: m and v for 8 elements, so a small model already has dozens of pages


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def train(model, optimizer, steps, seed=1, clip=None):
    """A regression task with a fixed data stream; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        loss = ((model(x.to(model[0].weight.dtype)).float() - y) ** 2).mean()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def max_diff(model_a, model_b):
    pairs = zip(model_a.parameters(), model_b.parameters())
    return max((a.float() - b.float()).abs().max().item() for a, b in pairs)


# ----------------------------------------------------------------------------------------------------
# Numerics: equal to torch.optim.AdamW for every budget
# ----------------------------------------------------------------------------------------------------

# the small model has 676 elements = 85 pages of 8; budgets: no limit, huge, 5 pages, one page
@pytest.mark.parametrize("budget", [None, 10**12, 5 * PAGE, PAGE])
def test_matches_torch_adamw_over_50_steps_for_any_budget(budget):
    reference = small_model()
    train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False), 50)
    model = small_model()
    optimizer = PagedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, page_bytes=PAGE,
                           device_budget_bytes=budget)
    train(model, optimizer, 50)
    assert max_diff(model, reference) <= 1e-6
    assert optimizer.state_bytes == 85 * PAGE
    if budget is None or budget >= optimizer.state_bytes:
        assert optimizer.stats.page_ins == optimizer.stats.page_outs == 0  # nothing ever moves
    else:
        assert optimizer.stats.peak_pool_bytes == budget  # pool full, never above
        assert optimizer.stats.page_ins > 0 and optimizer.stats.page_outs > 0


def test_matches_bitsandbytes_paged_adamw32bit():
    bnb = pytest.importorskip("bitsandbytes")
    reference = small_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU": bnb runs plain AdamW
        train(reference, bnb.optim.PagedAdamW32bit(reference.parameters(), lr=1e-2, weight_decay=0.1), 30)
    model = small_model()
    train(model, PagedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, page_bytes=PAGE,
                            device_budget_bytes=3 * PAGE), 30)
    assert max_diff(model, reference) <= 1e-6


def test_update_page_first_step_is_lr_times_sign_of_grad():
    # t = 1: m̂ = g, v̂ = g², so θ moves by lr·g/(|g| + ε) ≈ lr·sign(g), after decay θ·(1 − lr·λ)
    param, grad = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, -4.0, 1e-3])
    exp_avg, exp_avg_sq = torch.zeros(3), torch.zeros(3)
    adamw_update_page(param, grad, exp_avg, exp_avg_sq, 1, 0.1, 0.9, 0.999, 1e-8, 0.5)
    expected = torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(param, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(exp_avg, 0.1 * grad)
    torch.testing.assert_close(exp_avg_sq, 0.001 * grad**2)


# ----------------------------------------------------------------------------------------------------
# Page traffic: exact counts for a crafted case
# ----------------------------------------------------------------------------------------------------


def three_params_of_two_pages():
    params = [torch.nn.Parameter(torch.full((16,), float(i + 1))) for i in range(3)]  # 16 elements = 2 pages
    for p in params:
        p.grad = torch.ones(16)
    return params


def per_step(optimizer, key):
    return [entry[key] for entry in optimizer.stats.trace]


def test_traffic_with_a_pool_of_four_pages_for_six():
    # pages A0 A1 | B0 B1 | C0 C1, pool of 4. Step 1: A0 A1 born, B0 B1 born by prefetch while A updates;
    # prefetching C0 C1 (while B updates) evicts A0 A1 (written back). Pool ends holding B0 B1 C0 C1.
    # Step 2: A0 A1 come in over B0 B1, prefetched B0 B1 over C0 C1, prefetched C0 C1 over A0 A1: the
    # cyclic scan defeats LRU, 6 pages in and 6 out every step.
    params = three_params_of_two_pages()
    optimizer = PagedAdamW(params, page_bytes=PAGE, device_budget_bytes=4 * PAGE)
    for _ in range(3):
        optimizer.step()
    assert per_step(optimizer, "new_pages") == [6, 0, 0]
    assert per_step(optimizer, "page_outs") == [2, 6, 6]
    assert per_step(optimizer, "page_ins") == [0, 6, 6]
    assert per_step(optimizer, "prefetched") == [0, 4, 4]
    assert per_step(optimizer, "hits") == [4, 4, 4]
    assert per_step(optimizer, "bytes_moved") == [2 * PAGE, 12 * PAGE, 12 * PAGE]
    assert per_step(optimizer, "pool_bytes") == [4 * PAGE] * 3
    assert optimizer.stats.bytes_moved == 26 * PAGE
    assert optimizer.stats.peak_pool_bytes == 4 * PAGE
    assert list(optimizer._pool.slot_of) == [2, 3, 4, 5]  # B0 B1 C0 C1, least recently used first


def test_traffic_with_one_page_and_without_limit():
    one = PagedAdamW(three_params_of_two_pages(), page_bytes=PAGE, device_budget_bytes=PAGE + 7)
    for _ in range(2):
        one.step()
    assert per_step(one, "page_outs") == [5, 6] and per_step(one, "page_ins") == [0, 6]
    assert per_step(one, "prefetched") == [0, 0]  # no spare slot to prefetch into
    assert one.stats.peak_pool_bytes == PAGE
    unlimited = PagedAdamW(three_params_of_two_pages(), page_bytes=PAGE)
    for _ in range(3):
        unlimited.step()
    assert per_step(unlimited, "new_pages") == [6, 0, 0]
    assert per_step(unlimited, "bytes_moved") == [0, 0, 0]
    assert unlimited.stats.peak_pool_bytes == 6 * PAGE == unlimited.state_bytes


def test_lru_pool_evicts_least_recently_used_unpinned_page():
    pool = LRUPool(3)
    assert [pool.admit(page) for page in "abc"] == [(0, None), (1, None), (2, None)]
    pool.touch("a")  # order now b c a
    assert pool.victim() == "b"
    assert pool.admit("d") == (1, "b")  # d takes b's slot; order c a d
    assert pool.admit("e", pinned={"c"}) == (0, "a")  # c is pinned, a is next
    assert list(pool.slot_of.items()) == [("c", 2), ("d", 1), ("e", 0)]
    with pytest.raises(RuntimeError):
        pool.victim(pinned={"c", "d", "e"})
    unbounded = LRUPool(None)
    assert [unbounded.admit(i)[1] for i in range(100)] == [None] * 100


def test_recently_used_pages_stay_resident():
    # three one-page parameters, a pool of two pages; which pages move depends on which had gradients
    params = [torch.nn.Parameter(torch.ones(8)) for _ in range(3)]
    optimizer = PagedAdamW(params, page_bytes=PAGE, device_budget_bytes=2 * PAGE)

    def step_with_grads(*which):
        for i, p in enumerate(params):
            p.grad = torch.ones(8) if i in which else None
        optimizer.step()
        return optimizer.stats.trace[-1]

    assert step_with_grads(0, 1)["new_pages"] == 2  # pool: p0 p1
    assert step_with_grads(2)["page_outs"] == 1  # p2 born, evicts p0 (least recently used)
    assert step_with_grads(1)["hits"] == 1  # p1 still there: nothing moves
    last = step_with_grads(0)  # p0 comes back over p2 (p1 was just used)
    assert (last["page_ins"], last["page_outs"]) == (1, 1)
    assert list(optimizer._pool.slot_of) == [1, 0]


# ----------------------------------------------------------------------------------------------------
# Saving and resuming
# ----------------------------------------------------------------------------------------------------


def test_resume_from_state_dict_is_bit_exact():
    uninterrupted = small_model()
    train(uninterrupted, PagedAdamW(uninterrupted.parameters(), lr=1e-2, page_bytes=PAGE,
                                    device_budget_bytes=7 * PAGE), 40)

    first = small_model()
    optimizer = PagedAdamW(first.parameters(), lr=1e-2, page_bytes=PAGE, device_budget_bytes=7 * PAGE)
    losses = train(first, optimizer, 20, seed=1)
    saved_model, saved = copy.deepcopy(first.state_dict()), optimizer.state_dict()
    assert len(losses) == 20 and set(saved["state"]) == {0, 1, 2, 3}

    resumed = small_model(seed=5)
    resumed.load_state_dict(saved_model)
    optimizer = PagedAdamW(resumed.parameters(), lr=0.5, page_bytes=PAGE, device_budget_bytes=7 * PAGE)
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr"] == 1e-2
    # the data stream continues where it stopped: replay the first 20 batches on a throwaway generator
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    for _ in range(20):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        ((resumed(x) - y) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted.parameters()))


def test_state_dict_is_torch_adamw_layout_both_ways():
    model, reference = small_model(), small_model()
    ours = PagedAdamW(model.parameters(), lr=1e-2, page_bytes=PAGE, device_budget_bytes=3 * PAGE)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    train(model, ours, 10)
    train(reference, theirs, 10)
    mine, torchs = ours.state_dict(), theirs.state_dict()
    for index, saved in torchs["state"].items():
        assert torch.equal(mine["state"][index]["step"], saved["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(mine["state"][index][key], saved[key])
    # torch's state_dict loads into ours, and training continues identically
    fresh = PagedAdamW(model.parameters(), page_bytes=PAGE, device_budget_bytes=2 * PAGE)
    fresh.load_state_dict(torchs)
    train(model, fresh, 10, seed=2)
    train(reference, theirs, 10, seed=2)
    assert max_diff(model, reference) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# Groups, bf16, missing gradients, clipping
# ----------------------------------------------------------------------------------------------------


def groups(model):
    return [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.3},
            {"params": [model[0].bias, model[2].bias], "lr": 3e-2, "weight_decay": 0.0, "betas": (0.8, 0.99)}]


def test_param_groups_and_caller_clipping_match_torch():
    reference = small_model()
    train(reference, torch.optim.AdamW(groups(reference), lr=1e-2, foreach=False), 30, clip=0.5)
    model = small_model()
    optimizer = PagedAdamW(groups(model), lr=1e-2, page_bytes=PAGE, device_budget_bytes=4 * PAGE)
    train(model, optimizer, 30, clip=0.5)
    assert max_diff(model, reference) <= 1e-6


def test_bf16_params_update_in_fp32_then_round():
    # Oracle: torch AdamW on an fp32 copy that is rounded to bf16 after every step. Same arithmetic, so equal.
    model = small_model(dtype=torch.bfloat16)
    optimizer = PagedAdamW(model.parameters(), lr=1e-2, page_bytes=PAGE, device_budget_bytes=6 * PAGE)
    master = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    reference = torch.optim.AdamW(master, lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        ((model(x.bfloat16()).float() - y) ** 2).mean().backward()
        for p, m in zip(model.parameters(), master):
            m.grad = p.grad.float()
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for m in master:
                m.copy_(m.bfloat16().float())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(p.float(), m) for p, m in zip(model.parameters(), master))
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state_dict()["state"].values())


def test_params_without_grad_are_skipped():
    model = small_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    optimizer = PagedAdamW(model.parameters(), page_bytes=PAGE, device_budget_bytes=2 * PAGE)
    train(model, optimizer, 3)
    assert torch.equal(frozen, before)
    assert frozen not in optimizer.state
    assert optimizer.state_bytes == (4 + 16 + 1) * PAGE  # pages for the other three: 32, 128, 4 elements
    assert adamw_state_bytes(model.parameters()) == 8 * 676


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, named", [
    ({"device_budget_bytes": 63}, "device_budget_bytes"),
    ({"page_bytes": 0}, "page_bytes"),
    ({"page_bytes": -64}, "page_bytes"),
    ({"page_bytes": 60}, "page_bytes"),
    ({"lr": 0.0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"eps": 0.0}, "eps"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (0.9, -0.1)}, "betas"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_bad_input_is_refused(kwargs, named):
    with pytest.raises(ValueError, match=named):
        PagedAdamW(small_model().parameters(), **{"page_bytes": PAGE, **kwargs})


def test_bad_group_and_bad_params_are_refused():
    model = small_model()
    with pytest.raises(ValueError, match="lr"):
        PagedAdamW([{"params": model[0].parameters(), "lr": -1.0}], page_bytes=PAGE)
    with pytest.raises(ValueError, match="contiguous"):
        PagedAdamW([torch.nn.Parameter(torch.ones(4, 3).t())], page_bytes=PAGE)
    with pytest.raises(ValueError, match="dtype"):
        PagedAdamW([torch.nn.Parameter(torch.ones(4, dtype=torch.float64))], page_bytes=PAGE)
    optimizer = PagedAdamW(model.parameters(), page_bytes=PAGE)
    with pytest.raises(ValueError, match="groups"):
        optimizer.load_state_dict({"state": {}, "param_groups": []})


def test_default_page_fits_the_largest_parameter():
    """With page_bytes left out, LoRA-sized matrices get small pages instead of 2 MiB each."""
    from minilora.paged import DEFAULT_PAGE_BYTES, MIN_PAGE_BYTES, page_bytes_for

    lora = [torch.nn.Parameter(torch.zeros(16, 64)) for _ in range(4)]  # 1,024 elements → 8 KiB of moments
    assert page_bytes_for(lora) == 8192
    assert page_bytes_for([torch.nn.Parameter(torch.zeros(3))]) == MIN_PAGE_BYTES
    assert page_bytes_for([torch.nn.Parameter(torch.zeros(1024, 1024))]) == DEFAULT_PAGE_BYTES

    optimizer = PagedAdamW(p for p in lora)  # a generator, as model.parameters() is
    assert optimizer.page_bytes == 8192
    for p in lora:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert optimizer.state_bytes == 4 * 8192  # one 8 KiB page per matrix, not 4 × 2 MiB
    grouped = PagedAdamW([{"params": iter(lora[:2]), "lr": 1e-2}, {"params": iter(lora[2:])}])
    assert grouped.page_bytes == 8192 and len(grouped.param_groups[0]["params"]) == 2


def test_empty_parameter_list_is_a_clear_error():
    # It used to fail with "max() arg is an empty sequence".
    with pytest.raises(ValueError, match="params is empty"):
        PagedAdamW([])
    with pytest.raises(ValueError, match="params is empty"):
        PagedAdamW([p for p in small_model().parameters() if not p.requires_grad])
