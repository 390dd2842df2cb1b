"""`make bench`: run every benchmark in its own process and gather their Markdown tables.

Each bench_*.py prints a Markdown table and writes it to benchmarks/results/<name>.md. This script runs
them one after another (separate processes, so one benchmark's memory never inflates another's) and
joins the tables into benchmarks/results/README.md. Figures, not pass/fail: nothing here asserts a time.

    python benchmarks/run_all.py            # full sizes (minutes)
    python benchmarks/run_all.py --quick    # small sizes, a smoke run
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EXTRA_ARGS = {"bench_qlora_step.py": ["--profile"]}  # the op tables issue 12 asks for, before/after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    failed = []
    sections = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else []) + EXTRA_ARGS.get(script.name, [])
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(script.name)
            continue
        for table in sorted(RESULTS.glob(f"{script.stem}*.md")):
            sections.append(f"## {table.stem}\n\n{table.read_text().strip()}\n")
    (RESULTS / "README.md").write_text("# minilora benchmarks\n\n" + "\n".join(sections))
    print(f"wrote {RESULTS / 'README.md'}")
    if failed:
        print("failed:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
