"""The start of ``ocistore pull``: the store is opened on a helper thread while the HTTP
stack imports, yet errors come out as if it were opened in line: usage errors first and
without creating anything, a store that cannot be opened as one line with exit code 8."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _pull(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ocistore", "--root", str(root), "pull", "-q", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["Ubuntu:22.04"], "lowercase"),
        (["--platform", "linux", "busybox"], "platform"),
        (["--jobs", "0", "busybox"], "--jobs"),
    ],
)
def test_usage_errors_come_first_and_create_no_store(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    root = tmp_path / "store"
    proc = _pull(root, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr.lower(), proc.stderr
    assert not root.exists()


def test_a_store_that_cannot_be_opened_is_one_line_exit_8(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # The helper thread fails before any request: no registry is needed to see it.
    proc = _pull(blocker / "store", "127.0.0.1:9/x:1")
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr.startswith("ocistore: cannot open store at "), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
