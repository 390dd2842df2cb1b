"""exercises/grade.py: each submission in its own process, with a time limit and capped output; a report is
accepted only when it is pytest's for the tests the grader collected itself; the gradebook is written by the
grader alone, after the last student (issue 26: a submission deleted the gradebook, forged its own report to
0 failures and wiped another student's; an endless loop hung the loop; one printed 20 MB)."""

import csv
import importlib.util
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("grade", ROOT / "exercises" / "grade.py")
grade = importlib.util.module_from_spec(spec)
sys.modules["grade"] = grade  # before it runs, as an import would (its @dataclass looks itself up there)
spec.loader.exec_module(grade)

# Two toy tests through the exercises' own conftest (the `implementation` fixture loads the student's lora.py
# by path, as for the real exercises): a child takes a second or two instead of the real tests' torch import.
TOY_TESTS = """
def test_add(implementation):
    assert implementation("lora").add(2, 3) == 5


def test_mul(implementation):
    assert implementation("lora").mul(2, 3) == 6
"""
RIGHT = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
HALF = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a + b\n"
# 20 MB on the real stdout, after pytest's capture has ended (during a test pytest would swallow it).
FLOOD = "import atexit, os\natexit.register(lambda: os.write(1, b'x' * (20 << 20)))\n" + HALF
# Deletes the old gradebook and another student's report, forges its own report to 0 failures (after pytest
# wrote the real one), and leaves a sign that it ran.
FORGER = """
import atexit, os, pathlib, sys
OUT, SIGN = pathlib.Path({out!r}), pathlib.Path({sign!r})
FORGED = ('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="0" tests="2">'
          '<testcase classname="exercises.test_toy" name="test_add"/>'
          '<testcase classname="exercises.test_toy" name="test_mul"/></testsuite></testsuites>')
for victim in (OUT / "grades.csv", OUT / "alice.xml"):
    victim.unlink(missing_ok=True)

def forge():
    for arg in sys.argv:
        if arg.startswith("--junitxml="):
            pathlib.Path(arg.split("=", 1)[1]).write_text(FORGED)
    SIGN.write_text("mallory ran")

atexit.register(forge)

def add(a, b):
    return 0
"""


def toy_tests(tmp_path: Path) -> Path:
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(ROOT / "exercises" / "conftest.py", tests)
    (tests / "test_toy.py").write_text(TOY_TESTS)
    return tests


def submissions(tmp_path: Path, students: dict[str, str]) -> Path:
    folder = tmp_path / "submissions"
    for name, code in students.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "lora.py").write_text(code)
    return folder


def gradebook(out: Path) -> dict[str, dict]:
    with open(out / "grades.csv", newline="") as f:
        return {row["student"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grading")
    out = tmp / "grades"
    out.mkdir()
    (out / "grades.csv").write_text("student,passed\nalice,0\n")  # last week's gradebook and report
    (out / "alice.xml").write_text("<old/>")
    forger = textwrap.dedent(FORGER).format(out=str(out), sign=str(tmp / "mallory-ran"))
    subs = submissions(tmp, {"alice": RIGHT, "bob": HALF, "flood": FLOOD, "mallory": forger})
    (subs / "bob" / "notes.md").write_text("not a stub")
    assert grade.main([str(subs), "--out", str(out), "--tests-dir", str(toy_tests(tmp)), "--timeout", "300",
                       "--max-output", "10000"]) == 0
    return tmp, out


def test_each_student_is_graded_in_their_own_process(graded):
    _, out = graded
    book = gradebook(out)
    assert {name: (row["passed"], row["total"], row["status"]) for name, row in book.items() if name != "mallory"} \
        == {"alice": ("2", "2", "graded"), "bob": ("1", "2", "graded"), "flood": ("1", "2", "graded")}
    assert "not graded" in book["bob"]["note"] and "notes.md" in book["bob"]["note"]
    assert (out / "grades.md").read_text().count("\n") == 2 + 4


def test_an_output_flood_is_capped(graded):
    _, out = graded
    log = (out / "flood.log").read_bytes()
    assert len(log) < 10_000 + 200 and b"more bytes of output were cut" in log


def test_a_forged_report_and_a_deleted_gradebook_change_no_grade(graded):
    tmp, out = graded
    assert (tmp / "mallory-ran").read_text() == "mallory ran"  # the forger did run
    book = gradebook(out)
    assert book["mallory"]["passed"] == ""
    assert book["mallory"]["status"] == ("report rejected: the report says 0 test(s) failed, but pytest's exit "
                                         "status was 1")
    assert not (out / "mallory.xml").exists()
    assert book["alice"]["passed"] == "2" and b'name="test_mul"' in (out / "alice.xml").read_bytes()


def test_an_endless_loop_is_killed_at_the_time_limit(tmp_path):
    subs = submissions(tmp_path, {"loop": "import os\nos.fork()\nwhile True:\n    pass\n"})  # two loops
    started = time.perf_counter()
    grade.main([str(subs), "--out", str(tmp_path / "out"), "--tests-dir", str(toy_tests(tmp_path)),
                "--timeout", "5"])
    row = gradebook(tmp_path / "out")["loop"]
    assert row["status"] == "time limit (5 s): killed" and row["passed"] == ""
    assert 5 <= float(row["seconds"]) < 60 and time.perf_counter() - started < 300


def test_the_real_exercises_grade_the_reference_in_full(tmp_path):
    """The book's own switching.py, handed in as a student's file, passes every test of its chapter."""
    (tmp_path / "submissions" / "ref").mkdir(parents=True)
    shutil.copy(ROOT / "minilora" / "switching.py", tmp_path / "submissions" / "ref")
    assert grade.main([str(tmp_path / "submissions"), "--out", str(tmp_path / "out"),
                       "--tests", "test_01_switching.py"]) == 0
    row = gradebook(tmp_path / "out")["ref"]
    assert (row["passed"], row["total"], row["status"]) == ("6", "6", "graded")
