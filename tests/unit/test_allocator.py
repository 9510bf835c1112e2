"""The CLI's allocator tuning keeps freed buffers for reuse: megabyte buffers allocated and
freed one after another, as a pull does, fault far fewer pages in."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

CHURN = """
import resource, sys
if sys.argv[1] == "tuned":
    from ocistore.allocator import tune_for_streaming
    tune_for_streaming()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for size in range(4, 24):  # each buffer a little larger than the last one, then freed
    buffer = b"x" * (size << 20)
    del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], check=True, capture_output=True, text=True
    ).stdout
    return int(out)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="no glibc mallopt")
def test_tuning_cuts_page_faults_of_buffer_churn() -> None:
    plain, tuned = _faults("plain"), _faults("tuned")
    # 270 MiB in 20 buffers: each is a fresh mapping by default (69k faults with glibc
    # 2.36); tuned, the heap grows by the difference only (about 6k).
    assert tuned * 4 < plain, (plain, tuned)


def test_tuning_is_harmless_to_call_twice() -> None:
    from ocistore.allocator import tune_for_streaming

    tune_for_streaming()
    tune_for_streaming()
    assert bytes(3 << 20).count(0) == 3 << 20
