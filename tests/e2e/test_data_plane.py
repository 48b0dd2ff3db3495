"""Issue 4 acceptance: the data plane (exec, files, logs) through the real clients only.

Exec and file tests run once as `cwsandbox` and once as `wandb.sandbox` (the `sdk`
fixture). The session's daemon runs with a 16 MiB unary file limit (conftest.py,
MAX_FILE_BYTES), so a 20 MiB file goes through the client's streaming fallback
(StreamExec with sh/head/cat) in both directions while 5 MiB stays unary.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time

import pytest

from conftest import MAX_FILE_BYTES, Server

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 60  # seconds: bound on any single client operation's .result()


@pytest.fixture
def box(sdk, tag):
    """A running sandbox (the client's default idle main command)."""
    sb = sdk.Sandbox.run(tags=[tag])
    sb.wait(timeout=RPC)
    yield sb
    sb.stop(missing_ok=True).result(timeout=RPC)


def run(sb, *argv, **kw):
    return sb.exec(list(argv), **kw).result(timeout=RPC)


# --------------------------------------------------------------------------- exec


def test_exec_result_stdout_stderr_returncode(sdk, box):
    r = run(box, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.returncode) == ("out\n", "err\n", 3)
    r = run(box, "python", "--version")
    assert r.returncode == 0 and "Python 3" in r.stdout + r.stderr


def test_exec_check_raises_with_the_result(sdk, box):
    with pytest.raises(sdk.SandboxExecutionError) as err:
        run(box, "sh", "-c", "echo boom >&2; exit 1", check=True)
    assert err.value.exec_result.returncode == 1
    assert err.value.exec_result.stderr == "boom\n"


def test_exec_unknown_command_is_127(box):
    r = run(box, "no-such-command-xyz")
    assert r.returncode == 127
    assert "not found" in r.stderr


def test_exec_streams_one_item_per_line_as_printed(box):
    # One write(2) per line: `print(..., flush=True)` on a buffered stdout. (`python -u`
    # would write "0" and "\n" separately, and the daemon forwards writes as they come,
    # without coalescing, so the client could see two items.)
    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)\n"
    p = box.exec(["python", "-c", code])
    items, times = [], []
    for item in p.stdout:
        items.append(item)
        times.append(time.monotonic())
    assert p.result(timeout=RPC).returncode == 0
    assert items == ["0\n", "1\n", "2\n"]
    # Each line arrived when printed (0.3 s apart), not all at the end; lenient for a
    # consumer thread that picks up the first item late on a loaded machine.
    assert times[-1] - times[0] >= 0.25


def test_exec_cwd(box):
    assert run(box, "pwd", cwd="/tmp").stdout == "/tmp\n"
    # Without cwd: the image's working directory.
    assert run(box, "pwd").stdout == "/workspace\n"


def test_exec_timeout_kills_the_command(sdk, box):
    start = time.monotonic()
    with pytest.raises(sdk.SandboxTimeoutError):
        run(box, "sh", "-c", "echo $$ > /tmp/victim.pid; exec sleep 60", timeout_seconds=2)
    assert time.monotonic() - start < 20
    deadline = time.monotonic() + 10
    while True:
        r = run(box, "sh", "-c", 'kill -0 "$(cat /tmp/victim.pid)" 2>/dev/null && echo alive || echo dead')
        if r.stdout == "dead\n" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.stdout == "dead\n", "the timed-out command is still running"


def test_exec_stdin_cat_round_trip(sdk, box):
    p = box.exec(["cat"], stdin=True)
    p.stdin.write(b"hello\n").result(timeout=RPC)
    p.stdin.writeline("world").result(timeout=RPC)
    p.stdin.close().result(timeout=RPC)
    r = p.result(timeout=RPC)
    assert (r.stdout, r.returncode) == ("hello\nworld\n", 0)


def test_exec_stdin_200k_binary(box):
    data = os.urandom(200 * 1024) + bytes(range(256))
    p = box.exec(["cat"], stdin=True)
    for i in range(0, len(data), 50_000):
        p.stdin.write(data[i : i + 50_000]).result(timeout=RPC)
    p.stdin.close().result(timeout=RPC)
    r = p.result(timeout=RPC)
    assert r.returncode == 0
    assert r.stdout_bytes == data


def test_exec_interactive_python(box):
    p = box.exec(["python", "-u", "-i", "-q"], stdin=True)
    p.stdin.writeline("print(6 * 7)").result(timeout=RPC)
    p.stdin.close().result(timeout=RPC)
    r = p.result(timeout=RPC)
    assert "42" in r.stdout


def test_exec_stdin_write_after_close_raises(sdk, box):
    p = box.exec(["cat"], stdin=True)
    p.stdin.write(b"before\n").result(timeout=RPC)
    p.stdin.close().result(timeout=RPC)
    assert p.stdin.closed
    # The client refuses the write itself (StreamWriter: "stream is closed").
    with pytest.raises(sdk.SandboxExecutionError, match="closed"):
        p.stdin.write(b"after\n").result(timeout=RPC)
    with pytest.raises(sdk.SandboxExecutionError):
        p.stdin.writeline("after").result(timeout=RPC)
    # close() again is idempotent; the command saw only what came before the close.
    p.stdin.close().result(timeout=RPC)
    r = p.result(timeout=RPC)
    assert (r.stdout, r.returncode) == ("before\n", 0)


def test_exec_stdin_write_after_exit_raises(sdk, box):
    p = box.exec(["true"], stdin=True)
    assert p.result(timeout=RPC).returncode == 0
    with pytest.raises(sdk.SandboxExecutionError):
        p.stdin.write(b"too late\n").result(timeout=RPC)


def _read_terminal(session, until: bytes, timeout: float = RPC) -> bytes:
    """Terminal output up to (and including) the chunk holding `until`."""
    out = b""
    deadline = time.monotonic() + timeout
    for chunk in session.output:
        out += chunk
        if until in out or time.monotonic() > deadline:
            break
    return out


def test_shell_has_a_pty_with_the_requested_size(sdk, box):
    session = box.shell(["/bin/sh"], width=100, height=40)
    session.stdin.writeline("tty; stty size; echo MARK-$((6*7))").result(timeout=RPC)
    out = _read_terminal(session, b"MARK-42")
    assert b"MARK-42" in out, out
    assert re.search(rb"/dev/pts/\d+", out), out
    assert b"40 100" in out, out
    # A resize reaches the terminal (TIOCSWINSZ on the PTY).
    session.resize(120, 50)
    time.sleep(0.3)
    session.stdin.writeline("stty size; echo MARK-$((7*7))").result(timeout=RPC)
    out = _read_terminal(session, b"MARK-49")
    assert b"50 120" in out, out
    session.stdin.writeline("exit 5").result(timeout=RPC)
    for _ in session.output:
        pass
    assert session.result(timeout=RPC).returncode == 5


def test_exec_with_tty_isatty(box):
    # Python's own view: stdin/stdout are terminals under shell(), pipes under exec().
    code = "import os, sys; print(os.isatty(0), os.isatty(1), flush=True)"
    assert run(box, "python", "-c", code).stdout == "False False\n"
    session = box.shell(["python", "-c", code], width=80, height=24)
    out = b"".join(session.output)
    assert b"True True" in out, out
    assert session.result(timeout=RPC).returncode == 0


def test_exec_without_stdin_sees_eof(box):
    # The client half-closes right after init: stdin EOF, the command still runs.
    r = run(box, "sh", "-c", "cat; echo done")
    assert (r.stdout, r.returncode) == ("done\n", 0)


def test_exec_large_output(box):
    r = run(box, "sh", "-c", "head -c 30000000 /dev/zero | tr '\\0' x")
    assert r.returncode == 0
    assert len(r.stdout_bytes) == 30_000_000


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.timeout(900)
def test_exec_1gb_output_keeps_daemon_memory_bounded(server: Server, tag):
    """1 GB through StreamExec: sandpitd's RSS grows by less than 256 MiB.

    The client (not the daemon) keeps every exec's output for `result()`, so this test
    runs once (plain cwsandbox) and its own process holds ~2-3 GB at the end.
    """
    from cwsandbox import Sandbox

    total = 1_000_000_000
    limit_kib = 256 << 10
    pid = server.pid
    assert pid is not None
    sb = Sandbox.run(tags=[tag])
    try:
        sb.wait(timeout=RPC)
        run(sb, "true")  # warm: the exec path's own allocations are part of the baseline
        base = _rss_kib(pid)
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kib(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        p = sb.exec(["head", "-c", str(total), "/dev/zero"], timeout_seconds=600)
        seen = 0
        for item in p.stdout:  # consumed and counted, never kept by the test
            seen += len(item)
        code = p.result(timeout=700).returncode
        elapsed = time.monotonic() - start
        done.set()
        sampler.join()
        del p
        growth = peak[0] - base
        print(
            f"\n1 GB exec output: {seen} bytes in {elapsed:.1f}s = {seen / elapsed / 1e6:.1f} MB/s; "
            f"sandpitd VmRSS base {base / 1024:.1f} MiB, peak {peak[0] / 1024:.1f} MiB, "
            f"growth {growth / 1024:.1f} MiB (limit {limit_kib / 1024:.0f} MiB)"
        )
        assert code == 0
        assert seen == total  # NUL bytes decode to one character each
        assert growth < limit_kib, f"sandpitd RSS grew by {growth / 1024:.1f} MiB"
    finally:
        sb.stop(missing_ok=True).result(timeout=RPC)


# --------------------------------------------------------------------------- files


def sha256(sb, path):
    return run(sb, "sha256sum", path).stdout.split()[0]


def test_files_text_binary_and_parent_dirs(sdk, box):
    box.write_file("/tmp/a/b/hello.txt", b"hello world\n").result(timeout=RPC)
    assert box.read_file("/tmp/a/b/hello.txt").result(timeout=RPC) == b"hello world\n"
    assert run(box, "cat", "/tmp/a/b/hello.txt").stdout == "hello world\n"
    blob = bytes(range(256)) * 64 + b"\0\r\n\xff"
    box.write_file("/tmp/blob.bin", blob).result(timeout=RPC)
    assert box.read_file("/tmp/blob.bin").result(timeout=RPC) == blob
    # Replaced whole.
    box.write_file("/tmp/blob.bin", b"short").result(timeout=RPC)
    assert box.read_file("/tmp/blob.bin").result(timeout=RPC) == b"short"
    # Files the sandbox wrote itself, and the image's.
    run(box, "sh", "-c", "printf made-inside > /tmp/inside.txt", check=True)
    assert box.read_file("/tmp/inside.txt").result(timeout=RPC) == b"made-inside"
    assert b"training done" in box.read_file("/workspace/train.py").result(timeout=RPC)


def test_files_5mib_unary(box):
    data = os.urandom(5 << 20)
    box.write_file("/tmp/five.bin", data).result(timeout=RPC)
    assert sha256(box, "/tmp/five.bin") == hashlib.sha256(data).hexdigest()
    assert box.read_file("/tmp/five.bin").result(timeout=RPC) == data


@pytest.mark.timeout(300)
def test_files_20mib_through_the_streaming_fallback(sdk, box):
    assert 20 << 20 > MAX_FILE_BYTES
    data = os.urandom(20 << 20)
    box.write_file("/tmp/twenty.bin", data, timeout_seconds=120).result(timeout=180)
    assert sha256(box, "/tmp/twenty.bin") == hashlib.sha256(data).hexdigest()
    assert box.read_file("/tmp/twenty.bin", timeout_seconds=120).result(timeout=180) == data


@pytest.mark.timeout(600)
def test_files_100mib_through_the_streaming_fallback(server: Server, tag):
    """Issue 4: the fallback must work for 100 MiB files, both ways (cwsandbox only)."""
    from cwsandbox import Sandbox

    data = os.urandom(100 << 20)
    digest = hashlib.sha256(data).hexdigest()
    sb = Sandbox.run(tags=[tag])
    try:
        sb.wait(timeout=RPC)
        t = time.monotonic()
        sb.write_file("/tmp/hundred.bin", data, timeout_seconds=300).result(timeout=400)
        up = time.monotonic() - t
        assert sha256(sb, "/tmp/hundred.bin") == digest
        t = time.monotonic()
        got = sb.read_file("/tmp/hundred.bin", timeout_seconds=300).result(timeout=400)
        down = time.monotonic() - t
        assert len(got) == len(data)
        assert hashlib.sha256(got).hexdigest() == digest
        print(f"\n100 MiB via fallback: write {up:.1f}s ({100 / up:.1f} MiB/s), read {down:.1f}s ({100 / down:.1f} MiB/s)")
    finally:
        sb.stop(missing_ok=True).result(timeout=RPC)


def test_missing_file_and_directory_raise_file_errors(sdk, box):
    with pytest.raises(sdk.SandboxFileError) as err:
        box.read_file("/tmp/does/not/exist").result(timeout=RPC)
    assert err.value.reason == "CWSANDBOX_FILE_NOT_FOUND"
    assert err.value.filepath == "/tmp/does/not/exist"
    with pytest.raises(sdk.SandboxFileError) as err:
        box.read_file("/tmp").result(timeout=RPC)
    assert err.value.reason == "CWSANDBOX_FILE_IS_DIRECTORY"
    with pytest.raises(sdk.SandboxFileError) as err:
        box.write_file("/tmp", b"x").result(timeout=RPC)
    assert err.value.reason == "CWSANDBOX_FILE_IS_DIRECTORY"


def test_read_and_write_file_streaming(box):
    data = os.urandom(3 << 20)
    chunks = [data[i : i + 100_000] for i in range(0, len(data), 100_000)]
    box.write_file_streaming("/tmp/streamed.bin", iter(chunks)).result(timeout=RPC)
    got = b"".join(box.read_file_streaming("/tmp/streamed.bin"))
    assert got == data


# --------------------------------------------------------------------------- logs

PRINTER = "import time\nfor i in range(5):\n    print(f'line {i}', flush=True)\n    time.sleep(0.2)\n"
LINES = [f"line {i}\n" for i in range(5)]


def test_stream_logs_follow_tail_and_timestamps(sdk, tag):
    sb = sdk.Sandbox.run("python", "-c", PRINTER, tags=[tag])
    sb.wait(timeout=RPC)
    # Follow from the start until the main process exits.
    assert list(sb.stream_logs(follow=True)) == LINES
    sb.wait_until_complete(timeout=RPC).result(timeout=RPC)
    # Readable after the sandbox ended.
    assert list(sb.stream_logs()) == LINES
    assert list(sb.stream_logs(tail_lines=2)) == LINES[-2:]
    stamped = list(sb.stream_logs(timestamps=True))
    assert len(stamped) == 5
    for line, plain in zip(stamped, LINES):
        m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z) (.*\n)", line)
        assert m, line
        assert m.group(3) == plain


def drop_connections(port: int) -> int:
    """Shuts down every TCP connection of this process to 127.0.0.1:`port`.

    A transient disconnect as the client meets it (the peer or the network
    resets the connection: UNAVAILABLE, which the client resumes from). The
    client's channels share one connection, so this is the socket under
    `sandbox._streaming_channel`. Closing that channel object instead cancels
    the call locally: grpc raises CancelledError inside the client's log task,
    which only catches Exception, so the client's iterator waits forever
    without a byte reaching the server (cwsandbox 1.22.0; nothing a server can
    answer changes that).
    """
    import socket

    dropped = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            fd = os.dup(int(name))
        except OSError:
            continue  # closed meanwhile
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        try:
            # grpc's sockets are AF_INET6, the peer an IPv4-mapped address.
            peer = sock.getpeername() if sock.family in (socket.AF_INET, socket.AF_INET6) else ()
            if peer[:2] in (("127.0.0.1", port), ("::ffff:127.0.0.1", port)):
                sock.shutdown(socket.SHUT_RDWR)
                dropped += 1
        except OSError:
            pass
        finally:
            sock.close()
    return dropped


# A line every 100 ms, each written in two halves 50 ms apart, so that some
# disconnects fall inside a line and the resume has to continue it.
HALVES = (
    "import sys, time\n"
    "for i in range(80):\n"
    "    sys.stdout.write('line '); sys.stdout.flush(); time.sleep(0.05)\n"
    "    sys.stdout.write(f'{i}\\n'); sys.stdout.flush(); time.sleep(0.05)\n"
)
HALVES_LINES = [f"line {i}\n" for i in range(80)]


@pytest.mark.parametrize("timestamps", [False, True], ids=["raw", "timestamps"])
def test_stream_logs_follow_resumes_after_a_disconnect(sdk, tag, server: Server, timestamps):
    sb = sdk.Sandbox.run("python", "-c", HALVES, tags=[tag])
    sb.wait(timeout=RPC)
    got: list[str] = []
    drops: list[int] = []
    done = threading.Event()

    def disconnect():
        # Five drops, each once the stream has resumed from the one before
        # (a line arrived since), then 0-90 ms on so they fall at varying
        # points of a line. A fixed period raced the client's resume backoff
        # (0.5 s, doubling while no data arrives, three tries): a drop in the
        # backoff found no connection, two in one resume gave up the stream.
        for i in range(5):
            seen = len(got)
            while len(got) <= seen:
                if done.wait(0.01):
                    return
            if done.wait(0.023 * i):
                return
            drops.append(drop_connections(server.port))

    t = threading.Thread(target=disconnect, daemon=True)
    t.start()
    try:
        for line in sb.stream_logs(follow=True, timestamps=timestamps):
            got.append(line)
    finally:
        done.set()
        t.join()
    assert len(drops) == 5 and all(drops), f"a drop found no connection to cut: {drops}"
    if timestamps:
        plain = []
        for line in got:
            m = re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (line \d+\n)", line)
            assert m, f"not one stamp then the line: {line!r}"
            plain.append(m.group(1))
        got = plain
    assert got == HALVES_LINES


def test_stream_logs_of_a_silent_main_is_empty(tag):
    from cwsandbox import Sandbox

    sb = Sandbox.run("sh", "-c", "sleep 0.3", tags=[tag])
    sb.wait(timeout=RPC)
    assert list(sb.stream_logs(follow=True)) == []
    assert list(sb.stream_logs()) == []


# --------------------------------------------------------------------------- functions


def test_session_function_remote_and_map(sdk, tag):
    defaults = sdk.SandboxDefaults(tags=(tag,))
    with sdk.Session(defaults) as session:

        @session.function()
        def add(x, y):
            return x + y

        assert add.remote(2, 3).result(timeout=120) == 5
        refs = add.map([(1, 1), (2, 2)])
        assert [r.result(timeout=120) for r in refs] == [2, 4]
