"""Issue 16 item 2: per-command accounting. Every exec and the main process get CPU
time, peak memory and how they ended, read through `sandpit commands ID --json`
(the `sandpit.v1.Accounting` service), driven through the real `cwsandbox` client
against the real daemon and kernel.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import Binaries, Principal, Server

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 120

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"
TOUCH_100M = "b = bytearray(100 << 20); b[::4096] = b'x' * len(b[::4096])"
TOUCH_1G = "b = bytearray(1 << 30); b[::4096] = b'x' * len(b[::4096])"


def cli(binaries: Binaries, server: Server, key: str, sandbox_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binaries.sandpit), "--server", server.url, "--api-key", key, "commands", sandbox_id, "--json"],
        capture_output=True, text=True, timeout=RPC,
    )


def commands(binaries: Binaries, server: Server, key: str, sandbox_id: str) -> list[dict]:
    out = cli(binaries, server, key, sandbox_id)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def by_argv(records: list[dict], *argv: str) -> dict:
    found = [r for r in records if r["argv"] == list(argv)]
    assert len(found) == 1, (argv, records)
    return found[0]


def cpu(r: dict) -> float:
    return r["cpu_user_seconds"] + r["cpu_system_seconds"]


def test_execs_get_cpu_memory_and_how_they_ended(tag, binaries: Binaries, server: Server,
                                                 principal_a: Principal, other_principal: Principal):
    from cwsandbox import Sandbox, SandboxTimeoutError

    with Sandbox.run(tags=[tag], resources={"memory": "512Mi"}) as sb:
        def run(*argv, **kw):
            return sb.exec(list(argv), **kw).result(timeout=RPC)

        assert run("python3", "-c", BURN).returncode == 0
        assert run("python3", "-c", TOUCH_100M).returncode == 0
        assert run("sh", "-c", "exit 3").returncode == 3
        assert run("sh", "-c", "kill -TERM $$").returncode == 143
        # Over the sandbox's memory limit: the kernel's OOM killer ends it.
        assert run("python3", "-c", TOUCH_1G).returncode == 137
        with pytest.raises(SandboxTimeoutError):
            run("sleep", "60", timeout_seconds=2)
        assert run("/no/such/binary").returncode == 127
        records = commands(binaries, server, principal_a.key, sb.sandbox_id)

        burn = by_argv(records, "python3", "-c", BURN)
        assert burn["outcome"] == "exited" and burn["exit_code"] == 0
        assert cpu(burn) >= 0.9, burn
        assert burn["duration_seconds"] >= cpu(burn) * 0.9, burn
        touch = by_argv(records, "python3", "-c", TOUCH_100M)
        assert touch["peak_memory_bytes"] >= 100 << 20, touch
        assert touch["peak_memory_bytes"] < 512 << 20, touch
        exit3 = by_argv(records, "sh", "-c", "exit 3")
        assert (exit3["outcome"], exit3["exit_code"], exit3["signal"]) == ("exited", 3, None)
        term = by_argv(records, "sh", "-c", "kill -TERM $$")
        assert (term["outcome"], term["signal"], term["exit_code"]) == ("signaled", 15, 143)
        oom = by_argv(records, "python3", "-c", TOUCH_1G)
        assert (oom["outcome"], oom["signal"]) == ("oom_killed", 9), oom
        slept = by_argv(records, "sleep", "60")
        assert slept["outcome"] == "timed_out", slept
        assert 1.5 <= slept["duration_seconds"] < 30, slept
        missing = by_argv(records, "/no/such/binary")
        assert (missing["outcome"], missing["exit_code"]) == ("infrastructure_error", 127), missing
        assert missing["detail"]
        # Ids number the sandbox's execs in order; every record has its times.
        assert [r["id"] for r in records] == [f"exec-{i}" for i in range(1, len(records) + 1)]
        assert all(r["start_time"] <= r["end_time"] for r in records)

        # Another principal's sandbox is not found, exactly like an unknown one.
        other = cli(binaries, server, other_principal.key, sb.sandbox_id)
        assert other.returncode != 0 and "not found" in other.stderr.lower(), other.stderr
    unknown = cli(binaries, server, principal_a.key, "0123456789ab")
    assert unknown.returncode != 0 and "not found" in unknown.stderr.lower(), unknown.stderr


def test_an_exec_running_when_the_sandbox_stops_is_sandbox_stopped(tag, binaries: Binaries, server: Server,
                                                                    principal_a: Principal):
    from cwsandbox import Sandbox

    sb = Sandbox.run(tags=[tag])
    try:
        victim = sb.exec(["sh", "-c", "touch /tmp/started; exec sleep 300"])
        deadline = time.monotonic() + 60
        while sb.exec(["test", "-e", "/tmp/started"]).result(timeout=RPC).returncode != 0:
            assert time.monotonic() < deadline, "the exec never started"
            time.sleep(0.1)
    finally:
        sb.stop().result(timeout=RPC)
    try:
        victim.result(timeout=RPC)
    except Exception:  # noqa: BLE001 - the client may report the cut stream either way
        pass
    records = commands(binaries, server, principal_a.key, sb.sandbox_id)
    r = by_argv(records, "sh", "-c", "touch /tmp/started; exec sleep 300")
    assert r["outcome"] == "sandbox_stopped", r


def test_the_main_process_is_accounted_and_records_survive_a_restart(tag, binaries: Binaries, server: Server,
                                                                      principal_a: Principal):
    from cwsandbox import Sandbox, SandboxFailedError

    script = f"python3 -c \"{TOUCH_100M}\"; exit 5"
    sb = Sandbox.run("sh", "-c", script, tags=[tag])
    with pytest.raises(SandboxFailedError):
        sb.wait_until_complete(timeout=RPC).result(timeout=RPC)
    records = commands(binaries, server, principal_a.key, sb.sandbox_id)
    main = [r for r in records if r["id"] == "main"]
    assert len(main) == 1, records
    main = main[0]
    assert main["argv"] == ["sh", "-c", script]
    assert (main["outcome"], main["exit_code"]) == ("exited", 5), main
    # The shell waited for python: its peak is the largest of them.
    assert main["peak_memory_bytes"] >= 100 << 20, main
    assert cpu(main) > 0, main

    with Sandbox.run(tags=[tag]) as live:
        assert live.exec(["sh", "-c", "exit 4"]).result(timeout=RPC).returncode == 4
        server.restart()
        after = commands(binaries, server, principal_a.key, live.sandbox_id)
        assert by_argv(after, "sh", "-c", "exit 4")["exit_code"] == 4
        # Numbering goes on after the restart.
        assert live.exec(["true"]).result(timeout=RPC).returncode == 0
        again = commands(binaries, server, principal_a.key, live.sandbox_id)
        assert [r["id"] for r in again] == ["exec-1", "exec-2"], again
    assert commands(binaries, server, principal_a.key, sb.sandbox_id) == records
