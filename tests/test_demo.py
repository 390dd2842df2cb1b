"""`python -m minilora demo` (`make demo`): the whole tour runs and its report says what the book promises."""

import re

import pytest

from minilora.__main__ import main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out, (out / "report.md").read_text()


def test_every_chapter_has_a_section(report):
    _, text = report
    for chapter in ("01-lora", "02-adalora", "03-nf4", "05-paged-optimizers", "06-qlora", "07-scaling"):
        assert f"chapters/{chapter}.md" in text


def test_plots_and_adapter_are_written(report):
    out, text = report
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (out / image).is_file(), image
    assert (out / "lora-adapter" / "adapter_model.safetensors").is_file()
    assert (out / "lora-adapter" / "adapter_config.json").is_file()


def test_merge_and_adapter_round_trips_agree(report):
    _, text = report
    merge = float(re.search(r"merge_lora: max \|logits\(merged\) − logits\(bypass\)\| = (\S+)", text).group(1))
    assert merge < 1e-4
    for loader in ("minilora load_adapter", "peft PeftModel.from_pretrained"):
        diff = float(re.search(rf"save_adapter → {loader}: max \|Δlogits\| = (\S+)", text).group(1))
        assert diff < 1e-5, loader


def test_methods_learn_the_new_skill(report):
    _, text = report
    assert "The pretrained model answers 0.0% of the cipher task" in text
    lora_row = re.search(r"\| LoRA r=4, all linear layers \| [\d,]+ \| ([\d.]+)% \|", text)
    assert float(lora_row.group(1)) >= 90
    qlora = re.search(r"final eval accuracy ([\d.]+)%", text)
    assert float(qlora.group(1)) >= 90


def test_quantization_and_paging_numbers(report):
    _, text = report
    assert "minilora NF4 bytes == bitsandbytes NF4 bytes on the Gaussian matrix: **True**" in text
    assert "| Gaussian 1024×1024 | nf4 | yes | 4.127 |" in text
    assert "(≤ budget: True)" in text
    paged_vs_torch = float(re.search(r"loss\(torch AdamW\)\| over 30 steps: (\S+)", text).group(1))
    assert paged_vs_torch <= 1e-6


def test_report_says_where_it_ran(report):
    _, text = report
    assert re.search(r"Machine: CPU \S+ \(.*\), \d+ thread\(s\), load [\d.]+, .*torch .*; torch threads: 1\.", text)
