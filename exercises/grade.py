"""Grade every student's exercises, each in a process of its own, and write one gradebook.

    python exercises/grade.py submissions/ --out grades/
    python exercises/grade.py submissions/ --out grades/ --tests test_01_lora.py test_03_nf4.py --timeout 300

`submissions/` holds one folder per student (alice/, bob/, ...) with their lora.py, nf4.py, ... (the stubs of
exercises/learner/, filled in). For each student in turn, the grader

1. makes a fresh temporary folder with a copy of the exercise tests (this folder without learner/) and a
   copy of the student's files: only regular files named like a stub, at most 1 MB each (no links);
2. runs pytest there in a new process: its own session and process group, the temporary folder as its
   working folder and cache (MINILORA_CACHE), files it writes capped at 1 GiB, a time limit (--timeout,
   after which the whole group is killed) and its output kept up to --max-output bytes;
3. reads the JUnit report pytest wrote into the temporary folder and accepts it only if it lists exactly
   the tests the grader collected beforehand from its own copy (no student code ran there) and agrees with
   pytest's exit status (0: every test passed; 1: some failed);
4. kills whatever is left of the process group and deletes the temporary folder.

Only after the last student has finished does it write into --out: grades.csv and grades.md (one row per
student: passed / total, or why there is no grade) and, per student, <name>.xml (the accepted report) and
<name>.log (the output pytest printed, cut at --max-output).

What this protects against: a mistake or a prank in one submission — an endless loop, an output flood, a
crash, a file deleted or overwritten in the working folder, another student's report or the gradebook
deleted or forged (they do not exist yet while students run), a report edited to "0 failures" (it then
disagrees with the exit status or with the tests the grader expects). What it does not protect against:
malicious code. Each submission runs as your user, so it can read and change every file you can, start a
process that outlives the time limit (outside its process group), or imitate pytest exactly, report and
exit status both. It is not a sandbox: for code you do not trust, run this script inside a container
(or a virtual machine) that holds only the submissions and this repository, without network access.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from minilora.files import write_atomically

HERE = Path(__file__).resolve().parent
STUBS = tuple(sorted(p.name for p in (HERE / "learner").glob("*.py")))
MAX_FILE = 1 << 20            # bytes of one submitted file
MAX_REPORT = 20 << 20         # bytes of a JUnit report the grader will parse
MAX_WRITE = 1 << 30           # bytes of any file a test process writes (RLIMIT_FSIZE)


@dataclass
class Grade:
    student: str
    status: str               # "graded", or why there is no grade
    passed: int = 0
    total: int = 0
    seconds: float = 0.0
    report: bytes = b""       # the accepted JUnit report
    output: bytes = b""       # what pytest printed, cut at --max-output
    note: str = ""


# ----------------------------------------------------------------------------------------------------
# One process: copied inputs, a time limit, capped output
# ----------------------------------------------------------------------------------------------------


def prepare(folder: Path, tests_dir: Path, submission: Path | None) -> list[str]:
    """Copy the tests (and the student's stub-named files) into `folder`; returns what was left out."""
    shutil.copytree(tests_dir, folder / "exercises", symlinks=True,
                    ignore=shutil.ignore_patterns("learner", "__pycache__", ".pytest_cache"))
    (folder / "pytest.ini").write_text("[pytest]\n")  # no configuration from the folders around it
    (folder / "cache").mkdir()
    (folder / "submission").mkdir()
    skipped = []
    for path in sorted(submission.iterdir()) if submission else []:
        if path.name in STUBS and path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_FILE:
            shutil.copyfile(path, folder / "submission" / path.name)
        else:
            skipped.append(path.name)
    return skipped


def pytest_command(folder: Path, tests: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider",
            "-c", str(folder / "pytest.ini"), "--rootdir", str(folder), *extra,
            *[f"exercises/{name}" for name in tests]]


def child_environment(folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINILORA_", "PYTEST_"))}
    return {**env, "MINILORA_CACHE": str(folder / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}


def limit_writes() -> None:
    """In the child, before it runs: files it writes are capped (a disk flood ends with SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_WRITE, MAX_WRITE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_limited(command: list[str], folder: Path, timeout: float, max_output: int) -> tuple[int | None, bytes]:
    """(exit status, or None when the time limit killed it; its output, cut at max_output bytes)."""
    process = subprocess.Popen(command, cwd=folder, env=child_environment(folder), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=limit_writes)
    kept, dropped = io.BytesIO(), [0]

    def drain():  # read everything (a full pipe would stall the child), keep the first max_output bytes
        for chunk in iter(lambda: process.stdout.read1(1 << 16), b""):
            room = max(0, max_output - kept.tell())
            kept.write(chunk[:room])
            dropped[0] += len(chunk) - min(room, len(chunk))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        with_group_killed(process)
    reader.join(timeout=10)  # a grandchild outside the group may hold the pipe: do not wait for it
    output = kept.getvalue()
    if dropped[0]:
        output += f"\n[grade.py: {dropped[0]:,} more bytes of output were cut]\n".encode()
    return status, output


def with_group_killed(process: subprocess.Popen) -> None:
    """SIGKILL to the child's whole process group (it leads its own session), then reap the child."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


# ----------------------------------------------------------------------------------------------------
# The tests that must be in every report, and checking a report against them
# ----------------------------------------------------------------------------------------------------


def expected_tests(tests_dir: Path, tests: list[str], timeout: float = 600) -> list[str]:
    """The test ids pytest collects from the instructor's tests ("test_01_lora::test_merge[2]"), collected
    in a copy where no student code exists (collecting imports only the test files)."""
    with tempfile.TemporaryDirectory(prefix="grade-collect-") as tmp:
        folder = Path(tmp)
        prepare(folder, tests_dir, None)
        command = pytest_command(folder, tests, "--collect-only", "--impl=reference", "-p", "no:warnings")
        status, output = run_limited(command, folder, timeout, 10 << 20)
    lines = output.decode(errors="replace").splitlines()
    ids = list(dict.fromkeys(line for line in lines if line.startswith("exercises/") and "::" in line))
    if status != 0 or not ids:
        raise SystemExit(f"grade.py: collecting the tests failed (exit status {status}):\n"
                         f"{output.decode(errors='replace')[-3000:]}")
    return [test_id(*line.split("::", 1)) for line in ids]


def test_id(path: str, name: str) -> str:
    """'exercises/test_01_lora.py', 'test_x[1]' (pytest's node id) or 'exercises.test_01_lora', 'test_x[1]'
    (JUnit's classname and name) → 'test_01_lora::test_x[1]'."""
    module = path.removesuffix(".py").replace("/", ".").removeprefix("exercises.")
    return f"{module}::{name}"


def check_report(report_file: Path, status: int, expected: list[str]) -> tuple[int, bytes]:
    """(tests passed, the report's bytes) if the report is pytest's for exactly the expected tests and
    agrees with its exit status; ValueError saying what is wrong otherwise."""
    if not report_file.is_file() or report_file.is_symlink():
        raise ValueError("no JUnit report")
    if report_file.stat().st_size > MAX_REPORT:
        raise ValueError(f"the JUnit report is larger than {MAX_REPORT:,} bytes")
    data = report_file.read_bytes()
    try:
        cases = list(ET.fromstring(data).iter("testcase"))
    except ET.ParseError as err:
        raise ValueError(f"the JUnit report is not XML ({err})") from None
    found = [test_id(case.get("classname", ""), case.get("name", "")) for case in cases]
    if sorted(found) != sorted(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise ValueError(f"the report lists other tests than were collected (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, {len(found)} entries for {len(expected)} tests)")
    failed = sum(case.find("failure") is not None or case.find("error") is not None for case in cases)
    passed = sum(not {child.tag for child in case} & {"failure", "error", "skipped"} for case in cases)
    if (status == 0) != (failed == 0):
        raise ValueError(f"the report says {failed} test(s) failed, but pytest's exit status was {status}")
    return passed, data


# ----------------------------------------------------------------------------------------------------
# One student, all students, the gradebook
# ----------------------------------------------------------------------------------------------------


def grade_one(submission: Path, tests_dir: Path, tests: list[str], expected: list[str], timeout: float,
              max_output: int) -> Grade:
    started = time.perf_counter()
    grade = Grade(submission.name, "graded", total=len(expected))
    with tempfile.TemporaryDirectory(prefix=f"grade-{submission.name}-", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        skipped = prepare(folder, tests_dir, submission)
        report_file = folder / "report.xml"
        command = pytest_command(folder, tests, "--impl=learner", f"--learner-dir={folder / 'submission'}",
                                 f"--junitxml={report_file}")
        status, grade.output = run_limited(command, folder, timeout, max_output)
        if status is None:
            grade.status = f"time limit ({timeout:g} s): killed"
        elif status not in (0, 1):
            grade.status = f"pytest did not finish (exit status {status})"
        else:
            try:
                grade.passed, grade.report = check_report(report_file, status, expected)
            except ValueError as err:
                grade.status = f"report rejected: {err}"
    grade.note = f"not graded (not a stub name, a link, or over {MAX_FILE:,} bytes): {skipped}" if skipped else ""
    grade.seconds = time.perf_counter() - started
    return grade


def write_gradebook(out: Path, grades: list[Grade]) -> None:
    """grades.csv, grades.md and each student's .xml / .log, each file written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [(g.student, g.passed if g.status == "graded" else "", g.total, g.status, f"{g.seconds:.1f}", g.note)
            for g in grades]
    header = ("student", "passed", "total", "status", "seconds", "note")
    table = io.StringIO()
    csv.writer(table).writerows([header, *rows])
    write_atomically(out / "grades.csv", lambda tmp: Path(tmp).write_text(table.getvalue()))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    write_atomically(out / "grades.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    for g in grades:
        write_atomically(out / f"{g.student}.log", lambda tmp, g=g: Path(tmp).write_bytes(g.output))
        (out / f"{g.student}.xml").unlink(missing_ok=True)  # an old report must not pass for this run's
        if g.report:
            write_atomically(out / f"{g.student}.xml", lambda tmp, g=g: Path(tmp).write_bytes(g.report))
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("submissions", type=Path, help="folder with one folder per student")
    parser.add_argument("--out", type=Path, required=True, help="where the gradebook and reports go")
    parser.add_argument("--tests", nargs="+", default=None,
                        help="test files to run (default: every test_*.py of the exercises)")
    parser.add_argument("--tests-dir", type=Path, default=HERE, help="folder holding conftest.py and the tests")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per student before it is killed")
    parser.add_argument("--max-output", type=int, default=200_000, help="bytes of output kept per student")
    args = parser.parse_args(argv)
    if not args.submissions.is_dir():
        parser.error(f"{args.submissions}: no such folder")
    if args.out.resolve().is_relative_to(args.submissions.resolve()):
        parser.error(f"--out {args.out} is inside {args.submissions}: it would be graded as a student")
    students = sorted(p for p in args.submissions.iterdir() if p.is_dir() and not p.name.startswith("."))
    tests = args.tests or sorted(p.name for p in args.tests_dir.glob("test_*.py"))
    expected = expected_tests(args.tests_dir, tests)
    grades = []
    for student in students:
        grades.append(grade_one(student, args.tests_dir, tests, expected, args.timeout, args.max_output))
        print(f"{student.name}: {grades[-1].status}, {grades[-1].passed}/{grades[-1].total} passed", flush=True)
    write_gradebook(args.out, grades)
    return 0


if __name__ == "__main__":
    sys.exit(main())
