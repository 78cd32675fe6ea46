"""Generated bad and edge inputs for every public op and module
(tests/fuzz_child.py), each family in a child process: a crash (a signal, or a
sanitizer's report under scripts/test_sanitized.sh) fails its test and names
the case that was running."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz_child import FAMILIES

CHILD = Path(__file__).with_name("fuzz_child.py")
EXAMPLES = int(os.environ.get("DLRM_OPS_FUZZ_EXAMPLES", "300"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fuzz(family):
    r = subprocess.run(
        [sys.executable, str(CHILD), family, str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    last = r.stdout.strip().splitlines()[-1:] or ["(nothing)"]
    assert r.returncode == 0, f"rc {r.returncode}; last case started: {last[0]}\n{r.stderr[-6000:]}"
    assert f"{family}: {EXAMPLES} examples passed" in r.stdout
