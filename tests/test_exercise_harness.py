"""exercises/conftest.py, the instructor flow: grading a folder of submissions (issue 13)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _conftest():
    spec = importlib.util.spec_from_file_location("exercise_conftest", ROOT / "exercises" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_submission_with_a_dataclass_and_future_annotations_loads(tmp_path):
    """The book's own code failed to load: 'NoneType' object has no attribute '__dict__' (44 passed, 45 errors)."""
    (tmp_path / "lora.py").write_text("from __future__ import annotations\n\nfrom dataclasses import dataclass\n\n\n"
                                      "@dataclass\nclass LoraConfig:\n    r: int = 8\n    target_modules: tuple = ()\n")
    module = _conftest()._load_learner_module(tmp_path, "lora")
    assert module.LoraConfig(r=4).r == 4 and module.__name__ in sys.modules


def _pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_a_missing_learner_folder_is_one_message(tmp_path):
    done = _pytest("exercises", f"--learner-dir={tmp_path / 'missing'}", "-q")
    output = done.stdout + done.stderr
    assert done.returncode == 4  # pytest's usage error: nothing ran
    assert output.count("no such folder") == 1 and "error" not in done.stdout.lower().replace("error:", "")


def test_each_stub_hint_is_shown_once():
    done = _pytest("exercises/test_01_lora.py", "--impl=learner", "--tb=short", "-q")
    assert done.returncode == 1
    hints = [line for line in done.stdout.splitlines() if line.startswith("E   NotImplementedError")]
    assert hints and len(hints) == len(set(hints)), hints  # (it printed the LoRALinear hint 14 times)
    assert "is still a stub (its hint is shown at the first test that reached it)" in done.stdout
