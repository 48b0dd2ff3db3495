"""Limits a hostile tenant runs into: what a sandbox sees when it exhausts a resource.

Each section is one resource; every test goes through the real client only.
"""

from __future__ import annotations

import hashlib
import re

import pytest

from conftest import MAX_FILE_BYTES

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 120  # seconds: bound on any single client operation's .result()


# =========================================================================== disk full during WriteFile
#
# A sandbox's writable layer has no size limit yet, so the disk that fills is a
# 16 MiB DISK scratch volume (an ext4 image on a loop device, docs/persistence.md).
# The session daemon's unary file limit is 16 MiB (conftest.MAX_FILE_BYTES): the
# 12 MiB write is one WriteFile message, the 24 MiB one takes the client's
# streaming fallback.

VOLUME = "/workspace"
NO_SPACE = re.compile(r"no space|enospc|resource.?exhausted|disk.*full|quota", re.IGNORECASE)


def _sh(sb, script: str) -> str:
    r = sb.exec(["sh", "-c", script]).result(timeout=RPC)
    assert r.returncode == 0, (script, r.returncode, r.stdout, r.stderr)
    return r.stdout


def _free_bytes(sb) -> int:
    """Bytes available to the sandbox's root (who is root only in its user namespace)."""
    avail, block = _sh(sb, f"stat -f -c '%a %S' {VOLUME}").split()
    return int(avail) * int(block)


@pytest.mark.parametrize("size_mib", [12, 24], ids=["unary", "streamed"])
def test_write_file_that_fills_the_disk_fails_cleanly(tag, size_mib):
    import cwsandbox as cw

    volume = cw.ScratchVolumeOptions(name="small", mount_path=VOLUME, size="16Mi")
    with cw.Sandbox.run(tags=[tag], volumes=[volume]) as sb:
        keep = b"written before the disk filled\n" * 100
        sb.write_file(f"{VOLUME}/keep.txt", keep).result(timeout=RPC)
        fill_digest = _sh(sb, f"head -c 8000000 /dev/urandom > {VOLUME}/fill && sha256sum < {VOLUME}/fill")
        entries_before = _sh(sb, f"ls -A {VOLUME}").split()
        free_before = _free_bytes(sb)
        assert free_before < size_mib << 20, "the write must not fit"

        data = hashlib.sha256(b"seed").digest() * ((size_mib << 20) // 32)
        with pytest.raises(Exception) as err:
            sb.write_file(f"{VOLUME}/big.bin", data, timeout_seconds=RPC).result(timeout=RPC)
        message = f"{type(err.value).__name__}: {err.value}"
        assert NO_SPACE.search(message), f"the error does not say the disk is full: {message}"

        # Nothing of the failed write is left: not the target, not the agent's temp file
        # (`.big.bin.sandpit-*`), and not its blocks (no unlinked file still held open).
        leftover = sorted(set(_sh(sb, f"ls -A {VOLUME}").split()) - set(entries_before))
        partial = ""
        if leftover and size_mib << 20 > MAX_FILE_BYTES:
            # Above the daemon's unary limit the client writes through an exec of
            # `head -c N > PATH` (cwsandbox's exec-stream fallback), straight into the
            # target: a known limit of the client, reported below, not hidden.
            sizes = _sh(sb, " ".join(["cd", VOLUME, "&&", "stat", "-c", "'%n=%s'", *leftover]))
            partial = f"{sizes.split()} of {len(data)} bytes"
            _sh(sb, " ".join(["cd", VOLUME, "&&", "rm", "-f", *leftover]))
        else:
            assert not leftover, f"the failed write left {leftover} in {VOLUME} after {message}"
        free_after = _free_bytes(sb)
        assert free_after >= free_before - (64 << 10), (free_before, free_after)

        # What was there before is intact, and the sandbox still works (and writes).
        assert sb.read_file(f"{VOLUME}/keep.txt").result(timeout=RPC) == keep
        assert _sh(sb, f"sha256sum < {VOLUME}/fill") == fill_digest
        sb.write_file(f"{VOLUME}/after.txt", b"still writable\n").result(timeout=RPC)
        assert _sh(sb, f"cat {VOLUME}/after.txt; echo ok") == "still writable\nok\n"
    if partial:
        pytest.xfail(
            "cwsandbox 1.22.0's exec-stream fallback (write_file above the daemon's "
            f"max_file_bytes) leaves a partial target when the disk fills: {partial}"
        )


# =========================================================================== (more limits below)
