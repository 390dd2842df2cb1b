"""minilora.train: the loop learns, resumes exactly, and its CLI fails clearly on bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora.build import lr_factor
from minilora.checkpoints import read_metrics
from minilora.options import HELP, RECIPES, TrainConfig
from minilora.qlora import Linear4bit
from minilora.train import build_parser, main, make_config, parse_args, train

ROOT = Path(__file__).resolve().parent.parent

# A few quick steps on the running example (fp32 compute: the CPU default).
QUICK = dict(model="tiny", batch_size=8, grad_accum=2, train_samples=256, eval_samples=64, lr=2e-3,
             max_grad_norm=1.0, warmup_ratio=0.0, r=4, lora_alpha=8, lora_dropout=0.1, progress=False)


def test_the_qlora_7b_recipe_is_chosen_explicitly():
    args = parse_args(["--recipe", "qlora-7b"])
    assert (args.method, args.r, args.lora_alpha, args.lora_dropout, args.target) == \
        ("qlora", 64, 16, 0.1, "all-linear")
    assert (args.lr, args.schedule, args.warmup_ratio, args.max_grad_norm, args.optimizer) == \
        (2e-4, "constant", 0.03, 0.3, "paged_adamw")
    assert (args.batch_size, args.grad_accum, args.gradient_checkpointing) == (1, 16, True)
    assert (args.quant_type, args.double_quant, args.blocksize) == ("nf4", True, 64)
    assert make_config(args) == make_config(recipe="qlora-7b") == TrainConfig(recipe="qlora-7b", **RECIPES["qlora-7b"])
    assert parse_args(["--recipe", "qlora-7b", "--r", "16"]).r == 16  # an explicit option wins
    assert make_config(recipe="qlora-7b", r=16).r == 16
    assert make_config(parse_args([])) == TrainConfig()  # no recipe: the running example's defaults
    with pytest.raises(ValueError, match="--recipe must be one of"):
        make_config(recipe="qlora-70b")


def test_every_option_has_help_and_shows_its_default():
    text = build_parser().format_help()
    for name, value in vars(parse_args([])).items():
        assert HELP[name].strip(), name
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
    assert text.count("(default:") >= len(HELP) - 1  # every option but --eval-data (None) names its default


def test_help_imports_no_model_library():
    """--help took 7.5 s, most of it importing transformers; it must need no model library now."""
    code = ("import sys\nfrom minilora.train import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in ('transformers', 'peft', 'bitsandbytes', 'matplotlib') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--lora-alpha" in done.stdout and done.stdout.strip().endswith("[]")


def test_lr_schedule():
    # warm-up 0, 1/3, 2/3, then constant 1 / cosine from 1 down towards 0
    assert [lr_factor(s, 3, 10, "constant") for s in range(5)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0]
    assert lr_factor(3, 3, 10, "cosine") == 1.0
    assert lr_factor(10, 3, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)


@pytest.mark.parametrize("bad, match", [
    (dict(method="prefix"), "--method must be one of"),
    (dict(r=0), "--r must be an integer >= 1"),
    (dict(lora_dropout=1.0), r"--lora-dropout must be a number in \[0, 1\)"),
    (dict(lr=-1.0), "--lr must be a number in"),
    (dict(warmup_ratio=1.5), "--warmup-ratio"),
    (dict(grad_accum=0), "--grad-accum"),
    (dict(optimizer="sgd"), "--optimizer must be one of"),
    (dict(method="adalora", r=4, target_r=8), "--target-r must be <= --r"),
    (dict(colour="blue"), "unknown option"),
])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        make_config(**bad)


def test_missing_model_folder_and_preset_without_random_init(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train(QUICK, model=str(tmp_path / "nope"), output_dir=str(tmp_path / "run"), max_steps=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        train(QUICK, model=str(tmp_path / "empty"), output_dir=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(ValueError, match="--random-init"):
        train(QUICK, model="llama-7b", output_dir=str(tmp_path / "run"), max_steps=1)


def test_bad_jsonl_line_is_named(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "<bos>abcdefgh<sep>", "response": "bcdefghi<eos>"}\n\n'
                    '{"prompt": "<bos>abcdefgh<sep>", "response": oops}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:3: not valid JSON"):
        train(QUICK, data=str(data), output_dir=str(tmp_path / "run"), max_steps=1)
    data.write_text('{"prompt": "<bos>abc<sep>"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:1: .*'prompt' and 'response'"):
        train(QUICK, data=str(data), output_dir=str(tmp_path / "run"), max_steps=1)
    data.write_text('{"prompt": "<bos>abc<sep>", "response": "XYZ"}\n')
    with pytest.raises(ValueError, match="example 1: .*unknown token 'X'"):
        train(QUICK, data=str(data), output_dir=str(tmp_path / "run"), max_steps=1)


def test_jsonl_errors_name_the_line_and_quote_little(tmp_path, capsys):
    """A line that was not UTF-8 raised a bare UnicodeDecodeError (no file, no line); a 1 MB response with a
    bad token was echoed whole to stderr; 100 000 nested brackets raised RecursionError."""
    data = tmp_path / "train.jsonl"
    good = '{"prompt": "<bos>abcd<sep>", "response": "bcde<eos>"}\n'
    data.write_bytes(good.encode() + b'{"prompt": "<bos>ab\xff<sep>", "response": "bc<eos>"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:2: not UTF-8 text \(byte 0xff at offset 19\)"):
        train(QUICK, data=str(data), output_dir=str(tmp_path / "run"), max_steps=1)
    data.write_text(good + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2: JSON nested too deeply"):
        train(QUICK, data=str(data), output_dir=str(tmp_path / "run"), max_steps=1)
    for line in ('{"prompt": "<bos>a<sep>", "response": "' + "X" * 1_000_000 + '"}', "{" + "x" * 1_000_000):
        data.write_text(good + line + "\n")
        assert main(["--data", str(data), "--max-steps", "1", "--output-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert "train.jsonl" in err and len(err) < 1000
    assert not (tmp_path / "run").exists()


def test_jsonl_training_scores_the_response_only(tmp_path):
    records = [{"prompt": "<bos>abcd<sep>", "response": "bcde<eos>"},
               {"prompt": "<bos>ponmlkj<sep>", "response": "apon<eos>"}] * 8
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = train(QUICK, data=str(data), eval_data=str(data), method="lora", max_steps=3, batch_size=4,
                   output_dir=str(tmp_path / "run"), save_every=0, eval_every=0)
    assert len(result.losses) == 3 and result.final_eval is not None
    assert 0.0 <= result.final_eval["accuracy"] <= 1.0


ADAPTER_ONLY = ("r", "lora_alpha", "lora_dropout")  # options --method full refuses (minilora.options)


def _run(tmp_path, name, **options):
    quick = {k: v for k, v in QUICK.items() if options.get("method") != "full" or k not in ADAPTER_ONLY}
    return train(quick, output_dir=str(tmp_path / name), **options)


@pytest.mark.parametrize("method, optimizer", [("qlora", "paged_adamw"), ("adalora", "adamw"),
                                               ("full", "adamw")])
def test_resume_gives_exactly_the_uninterrupted_losses(tmp_path, method, optimizer):
    options = dict(method=method, optimizer=optimizer, max_steps=6, save_every=3, eval_every=3,
                   save_total_limit=0, schedule="cosine", warmup_ratio=0.2)
    if method == "adalora":
        options.update(r=4, target_r=2, tinit=1, tfinal=1)
    if method == "full":
        options.update(gradient_checkpointing=False, lr=1e-3)
    full = _run(tmp_path, "full", **options)
    assert sorted(p.name for p in full.run_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not list(full.run_dir.glob(".checkpoint-*"))  # no temporary folder left behind
    assert (full.run_dir / "loss.png").stat().st_size > 0

    # An interrupted run: same options, the process "dies" after step 3 (we delete what came later).
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full.run_dir, interrupted)
    shutil.rmtree(interrupted / "checkpoint-6")
    resumed = _run(tmp_path, "interrupted", resume=True, **options)
    assert resumed.losses == full.losses  # every step, to the last bit
    assert resumed.evals == full.evals
    assert read_metrics(interrupted / "metrics.csv") == \
        [dict(r, elapsed_s=r2["elapsed_s"]) for r, r2 in zip(read_metrics(full.run_dir / "metrics.csv"),
                                                             read_metrics(interrupted / "metrics.csv"))]
    if method == "qlora":
        assert (full.run_dir / "checkpoint-6" / "adapter" / "adapter_model.safetensors").is_file()
        assert any(isinstance(m, Linear4bit) for m in resumed.model.modules())
    if method == "adalora":
        layers = [m for m in resumed.model.modules() if hasattr(m, "rank_mask")]
        assert sum(int(m.rank_mask.sum()) for m in layers) == 2 * len(layers)  # pruned to target_r
    with pytest.raises(ValueError, match="already holds a run"):
        _run(tmp_path, "full", **options)
    with pytest.raises(ValueError, match=r"options \['seed'\] differ"):
        _run(tmp_path, "interrupted", resume=True, **dict(options, seed=1))


def test_qlora_learns_the_running_example(tmp_path):
    result = _run(tmp_path, "qlora", method="qlora", max_steps=16, eval_every=0, save_every=0, lr=5e-3)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.5
    base = [p for n, p in result.model.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    assert result.model_bytes < 0.75 * 4 * result.all_params  # 4-bit blocks: well below fp32


def test_cli_defaults_run_and_log_cleanly(tmp_path):
    """`python -m minilora.train --max-steps 2` failed at once with its own defaults (r=64 on the tiny model).
    Not on a terminal, progress is one plain line per tenth of the run: no redraws, no escape codes."""
    cmd = [sys.executable, "-m", "minilora.train", "--max-steps", "2", "--output-dir", str(tmp_path / "cli")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "final eval: loss" in done.stdout and "threads: 1 " in done.stdout
    assert "qlora step 1/2: loss" in done.stderr and "qlora step 2/2: loss" in done.stderr
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr
    rows = read_metrics(tmp_path / "cli" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "cli" / "loss.png").is_file()
    assert (tmp_path / "cli" / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_errors(tmp_path, capsys):
    assert main(["--lora-dropout", "1.5", "--output-dir", str(tmp_path / "a")]) == 2
    assert "--lora-dropout must be a number in [0, 1)" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "b")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["--method", "prefix-tuning", "--output-dir", str(tmp_path / "c")]) == 2
    assert "--method must be one of ('full', " in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing created on failure


# ----------------------------------------------------------------------------------------------------
# Defects found by trying the CLI as a new user (issue 13)
# ----------------------------------------------------------------------------------------------------


def test_a_target_typo_is_an_error_and_creates_nothing(tmp_path):
    """`--target q_proj,v_prj` trained only q_proj and exited 0."""
    with pytest.raises(ValueError, match=r"entries \['v_prj'\] of target_modules"):
        train(QUICK, method="lora", target="q_proj,v_prj", output_dir=str(tmp_path / "run"), max_steps=1)
    assert not (tmp_path / "run").exists()  # it left runs/errN/config.json behind


def test_resume_without_a_checkpoint_creates_no_folder(tmp_path):
    with pytest.raises(ValueError, match="--resume: no complete checkpoint-<step> folder"):
        train(QUICK, output_dir=str(tmp_path / "run"), resume=True, max_steps=1)
    assert not (tmp_path / "run").exists()


def test_missing_eval_data_is_named(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "<bos>abcd<sep>", "response": "bcde<eos>"}\n' * 8)
    with pytest.raises(FileNotFoundError, match=r"--eval-data: no such file .*nope.jsonl"):
        train(QUICK, data=str(data), eval_data=str(tmp_path / "nope.jsonl"), batch_size=4,
              output_dir=str(tmp_path / "run"), max_steps=1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["lora", "qlora", "adalora"])
def test_every_run_ends_with_an_adapter_peft_loads(tmp_path, method):
    """AdaLoRA runs wrote no adapter, and --save-every 0 wrote no weights at all."""
    import warnings

    import peft

    from minilora.adalora import svd_layers
    from minilora.data import pretrained_tiny_llama
    from minilora.lora import lora_layers

    options = dict(r=4, target_r=2, tinit=1, tfinal=1) if method == "adalora" else {}
    result = train(QUICK, method=method, max_steps=4, save_every=0, eval_every=0,
                   output_dir=str(tmp_path / "run"), **options)
    assert not list(result.run_dir.glob("checkpoint-*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft only warns on missing keys: make that an error
        theirs = peft.PeftModel.from_pretrained(pretrained_tiny_llama(), str(result.run_dir / "adapter"))
    ours = svd_layers(result.model) if method == "adalora" else lora_layers(result.model)
    assert sorted(theirs.base_model.targeted_module_names) == sorted(ours)
    name, layer = next(iter(ours.items()))
    loaded = theirs.base_model.model.get_submodule(name).lora_B["default"]
    loaded = loaded if method == "adalora" else loaded.weight
    kept = layer.rank_mask if method == "adalora" else slice(None)
    assert torch.equal(loaded.detach(), layer.lora_B.detach()[:, kept])


def test_threads_are_chosen_and_an_option(tmp_path):
    before = torch.get_num_threads()
    try:
        train(QUICK, threads=1, max_steps=1, save_every=0, output_dir=str(tmp_path / "run"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert make_config(recipe="qlora-7b").threads == 0  # a real model: torch's default
    with pytest.raises(ValueError, match="--threads must be an integer >= 0"):
        make_config(threads=-1)


def test_the_7b_recipe_on_the_tiny_model_warns_about_its_rank_and_runs(tmp_path):
    """r=64 on a 64-wide model: peft accepts it, and so do we, with one warning that names the layers."""
    with pytest.warns(UserWarning, match=r"layer\(s\) get a rank larger than their weight allows: model.layers.0"):
        train(recipe="qlora-7b", output_dir=str(tmp_path / "run"), max_steps=1, progress=False, save_every=0)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
