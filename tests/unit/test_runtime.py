"""The process set-up both entry points share (common/runtime.py): what malloc keeps, and when.

Each case runs in a fresh interpreter: mallopt settings and the heap are the process's own.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.support.processes import ROOT

BODY = 1_400_000  # a full 5000-record payload
BODIES = 32  # the first wave of a burst of 64 in flight, in one of two receiver processes
PAGE = 4096

# Page faults while the first wave's bodies are allocated (and written, as reading them does).
FAULTS = f"""
import resource, sys
from common.runtime import keep_freed_memory, warm_heap
keep_freed_memory()
if sys.argv[1] == "warm":
    warm_heap()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bodies = [b"x" * {BODY} for _ in range({BODIES})]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_warmed_heap_takes_a_first_bursts_bodies_without_page_faults() -> None:
    pages = BODIES * BODY // PAGE
    # Without it, a new process faults in every page of the bodies it reads.
    assert _faults("cold") > 0.8 * pages
    assert _faults("warm") < 0.1 * pages
