"""CI guard: every exercise test must FAIL on the untouched learner stubs.

If a test passes against a stub that only raises NotImplementedError, the test checks nothing the
learner writes — it could pass by accident. This script runs the exercise tests against
exercises/learner/, reads pytest's JUnit report, and exits non-zero if any test passed or was skipped
(or if no test ran at all).
"""

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "--tb=no", "-p", "no:cacheprovider", str(HERE),
               "--impl=learner", f"--learner-dir={HERE / 'learner'}", f"--junitxml={report}"]
        subprocess.run(cmd, check=False)
        cases = ET.parse(report).getroot().iter("testcase")
        failed, not_failed = [], []
        for case in cases:
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            else:
                not_failed.append(name)  # passed or skipped: both mean the test can't see the stub
    if not failed and not not_failed:
        print("check_stubs_fail: no exercise test ran")
        return 1
    if not_failed:
        print(f"check_stubs_fail: {len(not_failed)} exercise test(s) did not fail on the untouched stubs:")
        for name in not_failed:
            print("   ", name)
        return 1
    print(f"check_stubs_fail: all {len(failed)} exercise tests fail on the untouched stubs, as they must.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
