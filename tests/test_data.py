"""The running example: tasks, tiny Llama, the pretrained cache, evaluate and finetune (minilora/data.py)."""

import pytest
import torch

from minilora import data
from minilora.data import (
    PROMPT_LEN,
    RESPONSE_LEN,
    VOCAB,
    build_tiny_llama,
    cipher,
    decode,
    encode,
    evaluate,
    finetune,
    make_task,
    pretrained_tiny_llama,
    tiny_llama_config,
)

L = PROMPT_LEN + RESPONSE_LEN


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model gains nothing from threads, and on a busy machine they make it many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained():
    # The shared cache (.cache/minilora or $MINILORA_CACHE): the first test run in CI pays the pretraining,
    # later tests and the notebooks reuse it.
    return pretrained_tiny_llama()


# -- tasks -----------------------------------------------------------------------------------------------


def test_make_task_is_deterministic_given_the_seed():
    a, b = make_task("finetune", 64, seed=5), make_task("finetune", 64, seed=5)
    c = make_task("finetune", 64, seed=6)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)
    # the two tasks share the prompts for the same seed; only the responses differ
    p = make_task("pretrain", 64, seed=5)
    assert torch.equal(p.input_ids[:, :PROMPT_LEN], a.input_ids[:, :PROMPT_LEN])


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_layout_and_label_masking(task):
    d = make_task(task, 50, seed=0)
    assert d.input_ids.shape == d.labels.shape == (50, L) and d.input_ids.dtype == torch.long
    assert len(d) == 50
    ids = d.input_ids
    assert (ids[:, 0] == VOCAB.index("<bos>")).all()
    assert (ids[:, PROMPT_LEN - 1] == VOCAB.index("<sep>")).all()
    assert (ids[:, -1] == VOCAB.index("<eos>")).all()
    x, y = ids[:, 1:PROMPT_LEN - 1], ids[:, PROMPT_LEN:-1]
    assert torch.equal(y, x if task == "pretrain" else cipher(x))
    # -100 exactly on the prompt, the tokens themselves on the response
    assert (d.labels[:, :PROMPT_LEN] == -100).all()
    assert torch.equal(d.labels[:, PROMPT_LEN:], ids[:, PROMPT_LEN:])


def test_cipher_text_and_slices():
    assert decode(cipher(torch.tensor(encode("abop")))) == "bcpa"
    d = make_task("finetune", 5, seed=1)
    text = decode(d.input_ids[0])
    assert text.startswith("<bos>") and text.endswith("<eos>") and encode(text) == d.input_ids[0].tolist()
    assert d.attention_mask.shape == d.input_ids.shape and bool(d.attention_mask.all())
    sub = d[1:3]
    assert len(sub) == 2 and torch.equal(sub.input_ids, d.input_ids[1:3]) and len(d[-1]) == 1


def test_bad_inputs_raise_with_the_value_in_the_message():
    with pytest.raises(ValueError, match="reverse"):
        make_task("reverse", 10, 0)
    with pytest.raises(ValueError, match="n=0"):
        make_task("finetune", 0, 0)
    with pytest.raises(ValueError, match="'z'"):
        encode("<bos>az")


# -- model, cache ----------------------------------------------------------------------------------------


def test_tiny_llama_has_llama_module_names_and_is_seeded():
    config = tiny_llama_config()
    assert config.vocab_size == len(VOCAB) and not config.tie_word_embeddings
    before = torch.random.get_rng_state()
    a, b = build_tiny_llama(seed=3), build_tiny_llama(seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)        # the global RNG is left alone
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    names = {name.split(".")[-1] for name, _ in a.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"} <= names
    assert build_tiny_llama(hidden_size=32, intermediate_size=64).config.hidden_size == 32


def test_cache_key_changes_with_config_and_pretraining_settings():
    key = data.cache_key()
    assert key == data.cache_key()
    assert data.cache_key(tiny_llama_config(hidden_size=32)) != key
    assert data.cache_key(pretrain=dict(data.PRETRAIN, steps=301)) != key


def test_cache_miss_writes_atomically_and_hit_reloads_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(data.PRETRAIN, "steps", 3)         # a cheap stand-in for the real pretraining
    trained = pretrained_tiny_llama(cache_dir=tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    key = data.cache_key()
    assert files == [f"tiny-llama-{key}.json", f"tiny-llama-{key}.safetensors"]   # no temporary files left
    again = pretrained_tiny_llama(cache_dir=tmp_path / "a")          # hit: loaded from disk
    retrained = pretrained_tiny_llama(cache_dir=tmp_path / "b")      # miss again: deterministic training
    assert again is not trained
    for (name, p), q, r in zip(trained.named_parameters(), again.parameters(), retrained.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), name
    assert not torch.equal(trained.lm_head.weight, build_tiny_llama(seed=0).lm_head.weight)


def test_pretrained_model_is_fresh_and_identical_across_calls(pretrained):
    other = pretrained_tiny_llama()
    assert other is not pretrained
    for (name, p), q in zip(pretrained.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name


def test_pretrained_knows_the_language_but_not_the_new_skill(pretrained):
    on_pretrain = evaluate(pretrained, make_task("pretrain", 512, seed=100))
    on_finetune = evaluate(pretrained, make_task("finetune", 512, seed=100))
    assert on_pretrain["accuracy"] > 0.99 and on_pretrain["loss"] < 0.05
    assert on_finetune["accuracy"] < 0.10 and on_finetune["loss"] > 1.0


# -- evaluate, finetune ----------------------------------------------------------------------------------


def test_evaluate_matches_a_hand_computed_loss_and_accuracy(pretrained):
    d = make_task("pretrain", 20, seed=7)
    d.input_ids[:3, PROMPT_LEN + 2] = cipher(d.input_ids[:3, PROMPT_LEN + 2])   # 3 examples now have a typo
    d.labels[:3, PROMPT_LEN + 2] = d.input_ids[:3, PROMPT_LEN + 2]
    with torch.no_grad():
        logits = pretrained(input_ids=d.input_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, PROMPT_LEN - 1:-1].reshape(-1, len(VOCAB)),
                                             d.input_ids[:, PROMPT_LEN:].reshape(-1))
    result = evaluate(pretrained, d, batch_size=6)                   # batches of 6, 6, 6, 2
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert result["accuracy"] == pytest.approx(17 / 20)              # the copier copies, so the typos miss


def test_full_finetune_learns_the_new_skill(pretrained):
    model = pretrained_tiny_llama()
    train, held_out = make_task("finetune", 2000, seed=1), make_task("finetune", 512, seed=2)
    calls = []

    def after_step(step):
        calls.append((step, model.lm_head.weight.grad is not None))

    history = finetune(model, train, steps=60, lr=1e-3, batch_size=32, seed=0, after_step=after_step,
                       eval_data=held_out, eval_every=30)
    assert calls == [(step, True) for step in range(60)]            # after optimizer.step, before zero_grad
    assert [e[0] for e in history["eval"]] == [0, 30, 60] and len(history["loss"]) == 60
    first, last = history["eval"][0], history["eval"][-1]
    assert first[2] < 0.10 and last[2] > 0.90 and last[1] < first[1] / 10
    assert sum(history["loss"][-10:]) < sum(history["loss"][:10]) / 10
    # training is deterministic given the seeds
    again = pretrained_tiny_llama()
    finetune(again, train, steps=5, lr=1e-3, seed=0)
    model5 = pretrained_tiny_llama()
    finetune(model5, train, steps=5, lr=1e-3, seed=0)
    assert torch.equal(again.lm_head.weight, model5.lm_head.weight)


def test_finetune_rejects_bad_arguments(pretrained):
    d = make_task("finetune", 16, 0)
    with pytest.raises(ValueError, match="batch_size"):
        finetune(pretrained, d, steps=1, lr=1e-3, batch_size=32)
    with pytest.raises(ValueError, match="lr"):
        finetune(pretrained, d, steps=1, lr=0.0, batch_size=8)
    with pytest.raises(ValueError, match="eval_every"):
        finetune(pretrained, d, steps=1, lr=1e-3, batch_size=8, eval_every=5)
    frozen = build_tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        finetune(frozen, d, steps=1, lr=1e-3, batch_size=8)
