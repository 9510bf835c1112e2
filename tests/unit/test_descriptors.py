"""The CLI's descriptor budget: a raised soft limit, a descriptor table grown while the
process has one thread, and an unpack that fits under a low limit all the same."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], check=True, capture_output=True, text=True
    ).stdout


def test_prepare_raises_the_soft_limit_and_grows_the_table() -> None:
    out = _run(
        """
        import resource
        from ocistore.descriptors import prepare_for_unpacking
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        def fdsize():
            for line in open("/proc/self/status"):
                if line.startswith("FDSize:"):
                    return int(line.split()[1])
        before = fdsize()
        prepare_for_unpacking()
        soft, hard2 = resource.getrlimit(resource.RLIMIT_NOFILE)
        raised = soft == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
        print(before, fdsize(), raised, hard2 == hard)
        """
    )
    before, after, raised, same_hard = out.split()
    assert int(before) < 512 <= int(after)
    assert raised == "True" and same_hard == "True"


def test_unpack_of_many_directories_fits_under_a_low_descriptor_limit() -> None:
    # 300 directories, each with a file: the directory cache used to keep up to 256
    # descriptors open whatever the limit, and failed with EMFILE under a soft limit of 200.
    out = _run(
        """
        import io, os, resource, tarfile, tempfile
        from ocistore.unpack import unpack_layer
        from ocistore.whiteouts import UnpackOptions, WhiteoutFormat
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(300):
                d = tarfile.TarInfo(f"d{i:03}")
                d.type, d.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(d)
            for i in range(300):
                f = tarfile.TarInfo(f"d{i:03}/f")
                f.size = 1
                tar.addfile(f, io.BytesIO(b"x"))
        buf.seek(0)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        dest = os.path.join(tempfile.mkdtemp(), "layer")
        os.mkdir(dest)
        result = unpack_layer(buf, dest, UnpackOptions(WhiteoutFormat.OCI, False, False))
        print(result.entries, sum(len(files) for _, _, files in os.walk(dest)))
        """
    )
    assert out.split() == ["600", "300"]


def test_prepare_is_quiet_when_the_last_slot_is_the_lowest_free_one() -> None:
    # A hard limit of 16 with descriptors 0-14 taken: its own /dev/null opens as 15, the
    # very slot it grows the table to. Best effort: no error, and 15 is left free.
    out = _run(
        """
        import os, resource
        from ocistore.descriptors import prepare_for_unpacking
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
        while os.open(os.devnull, os.O_RDONLY) < 14:  # lowest free first: 0-14 in use
            pass
        prepare_for_unpacking()
        print(os.open(os.devnull, os.O_RDONLY))  # 15 is free again
        """
    )
    assert out.split() == ["15"]
