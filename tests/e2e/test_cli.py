"""Issue 16 item 3: the CLI's verbs against the session daemon, as Docker users type
them: `sandpit create` (every flag checked from inside and through the real client),
`sandpit exec` (exit codes, stdin, a real PTY with raw mode, resizes and ^D), `sandpit
cp` (both ways: files with their modes, directories, streams past the one-message
limit, `-` tar streams, errors), `--json` on the listings, shell completions.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import pty
import select
import shutil
import signal
import stat
import struct
import subprocess
import tarfile
import termios
import time
from pathlib import Path

import pytest

from conftest import MAX_FILE_BYTES, Binaries, Principal, Server
from test_parity import read_cgroup

pytestmark = pytest.mark.usefixtures("client_env")

RPC = 120


@pytest.fixture
def sandpit(binaries: Binaries, server: Server, principal_a: Principal):
    """Runs `sandpit --server URL --api-key KEY ARGS...` as principal A."""

    def run(*args: str, input: bytes | str | None = None, check: bool = True, text: bool = True):
        if isinstance(input, bytes):
            text = False
        proc = subprocess.run(
            [str(binaries.sandpit), "--server", server.url, "--api-key", principal_a.key, *args],
            input=input, capture_output=True, text=text, timeout=RPC,
        )
        if check:
            assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    run.argv = [str(binaries.sandpit), "--server", server.url, "--api-key", principal_a.key]
    return run


@pytest.fixture
def box(sandpit, tag):
    """A running sandbox made by `sandpit create`; its id."""
    return sandpit("create", "--tag", tag, "python:3.11", "--", "sleep", "infinity").stdout.strip()


def sh(sandpit, sandbox_id: str, script: str, **kw):
    return sandpit("exec", sandbox_id, "--", "sh", "-c", script, **kw)


# --------------------------------------------------------------------------- create


def test_create_applies_every_flag(sandpit, tag):
    from cwsandbox import Sandbox

    out = sandpit(
        "create", "-e", "GREETING=hello world", "-e", "EMPTY=", "--memory", "512Mi",
        "--cpus", "1.5", "--tag", tag, "--tag", "cli-extra", "--lifetime", "30m",
        "--name", "cli-box", "-w", "/tmp", "python:3.11", "--",
        "sh", "-c", 'echo "main:$GREETING:$PWD"; exec sleep infinity',
    )
    sandbox_id = out.stdout.strip()
    assert sandbox_id and "\n" not in sandbox_id
    # Waited for, like `docker run -d`: already running.
    record = json.loads(sandpit("get", sandbox_id, "--json").stdout)
    assert record["state"] == "running", record
    assert record["max_lifetime_seconds"] == 1800
    assert sorted(record["tags"]) == sorted([tag, "cli-extra"])
    assert record["display_name"] == "cli-box"
    assert record["command"][:2] == ["sh", "-c"]

    # The main command's environment and directory, from its output.
    for _ in range(600):
        logs = sandpit("logs", sandbox_id).stdout
        if logs:
            break
        time.sleep(0.1)
    assert logs == "main:hello world:/tmp\n"
    inside = sh(sandpit, sandbox_id, 'echo "$GREETING|${EMPTY-unset}"; nproc; head -1 /proc/meminfo')
    greeting, nproc, memtotal = inside.stdout.splitlines()
    assert greeting == "hello world|"
    assert nproc == "2"  # ceil(1.5)
    assert memtotal.split()[1] == str(512 << 10)  # kB
    assert read_cgroup(sandbox_id, "memory", "memory.limit_in_bytes", "memory.max") == str(512 << 20)

    # The real client sees the tags.
    listed = Sandbox.list(tags=["cli-extra", tag]).result(timeout=RPC)
    assert [sb.sandbox_id for sb in listed] == [sandbox_id]


def test_create_docker_memory_spelling_and_json(sandpit, tag):
    created = json.loads(sandpit(
        "create", "--json", "--memory", "1g", "--tag", tag, "python:3.11", "--", "sleep", "infinity",
    ).stdout)
    assert created["state"] == "running"
    sandbox_id = created["id"]
    accepted = json.loads(sandpit("create", "--json", "--no-wait", "--tag", tag, "python:3.11").stdout)
    assert accepted["id"] and accepted["state"] in ("pending", "creating", "running", "completed")
    assert read_cgroup(sandbox_id, "memory", "memory.limit_in_bytes", "memory.max") == str(1 << 30)
    got = json.loads(sandpit("get", sandbox_id, "--json").stdout)
    for key in ("id", "state", "created_at", "started_at", "tags", "image", "max_lifetime_seconds"):
        assert got[key] == created[key], key


def test_create_errors_name_the_reason_and_exit_non_zero(sandpit, tag):
    refused = sandpit("create", "--tag", tag, "--lifetime", "400d", "python:3.11", check=False)
    assert refused.returncode == 125
    assert refused.stderr.startswith("sandpit: InvalidArgument (CWSANDBOX_INVALID_REQUEST)"), refused.stderr
    assert "max_lifetime_seconds" in refused.stderr
    assert refused.stdout == ""
    bad = sandpit("create", "--memory", "lots", "python:3.11", check=False)
    assert bad.returncode == 2 and "--memory" in bad.stderr
    # A main command that cannot start: FAILED, with the agent's reason.
    failed = sandpit("create", "--tag", tag, "python:3.11", "--", "/no/such/binary", check=False)
    assert failed.returncode == 125
    assert "failed" in failed.stderr and "/no/such/binary" in failed.stderr, failed.stderr


# --------------------------------------------------------------------------- exec


def test_exec_propagates_exit_codes_and_separates_streams(sandpit, box):
    both = sh(sandpit, box, "echo out; echo err >&2")
    assert (both.stdout, both.stderr) == ("out\n", "err\n")
    assert sh(sandpit, box, "exit 3", check=False).returncode == 3
    assert sh(sandpit, box, "kill -9 $$", check=False).returncode == 128 + 9
    assert sh(sandpit, box, "kill -TERM $$", check=False).returncode == 128 + 15
    assert sandpit("exec", box, "no-such-command", check=False).returncode == 127
    missing = sandpit("exec", "sb-does-not-exist", "--", "true", check=False)
    assert missing.returncode == 125
    assert "NotFound (CWSANDBOX_SANDBOX_NOT_FOUND)" in missing.stderr, missing.stderr
    # Without `--` too, like docker exec; -e and -w.
    assert sandpit("exec", "-e", "X=42", "-w", "/usr/lib", box, "sh", "-c", 'echo "$X $PWD"').stdout == "42 /usr/lib\n"
    # Without -i the command's stdin is closed at once: cat ends.
    assert sandpit("exec", box, "cat").stdout == ""


def test_exec_i_forwards_piped_stdin_until_eof(sandpit, box):
    data = os.urandom(300_000)
    r = sandpit("exec", "-i", box, "--", "sh", "-c", "sha256sum; echo done >&2", input=data)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert r.stderr == b"done\n"
    r = sandpit("exec", "-i", box, "--", "sh", "-c", "tr a-z A-Z; exit 4", input="hello\n", check=False)
    assert (r.returncode, r.stdout) == (4, "HELLO\n")


class Pty:
    """`sandpit ARGS...` on the slave side of a real pseudo-terminal."""

    def __init__(self, argv: list[str], rows: int, cols: int):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execv(argv[0], argv)
        self.buf = b""

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, needle: bytes, limit: float = 60) -> bytes:
        """Reads until `needle` appeared (the limit only ends a hang)."""
        end = time.monotonic() + limit
        while needle not in self.buf:
            left = end - time.monotonic()
            assert left > 0, f"{needle!r} never came; got {self.buf!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    chunk = b""
                assert chunk, f"EOF before {needle!r}; got {self.buf!r}"
                self.buf += chunk
        head, _, self.buf = self.buf.partition(needle)
        return head

    def resize(self, rows: int, cols: int) -> None:
        # The kernel sends SIGWINCH to the terminal's foreground group: sandpit.
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def test_exec_it_runs_on_a_pty(sandpit, box):
    term = Pty([*sandpit.argv, "exec", "-it", box, "--", "sh"], rows=40, cols=100)
    try:
        before = termios.tcgetattr(term.fd)
        term.write(b"tty; echo T$((6*7))\n")
        out = term.expect(b"T42")
        assert b"/dev/pts/" in out, out
        # Raw locally: what was typed is echoed by the sandbox's terminal (the
        # expression, not only its value).
        assert b"echo T$((6*7))" in out
        assert not termios.tcgetattr(term.fd)[3] & termios.ECHO
        term.write(b"stty size; echo S$((1+1))\n")
        assert b"40 100" in term.expect(b"S2")
        term.resize(50, 120)
        # SIGWINCH -> resize -> the command's terminal; polled, since the resize and
        # the typed line race by design.
        seen = b""
        for attempt in range(100):
            term.write(f"stty size; echo R{attempt}$((0))\n".encode())
            seen = term.expect(f"R{attempt}0".encode())
            if b"50 120" in seen:
                break
        assert b"50 120" in seen
        term.write(b"false\n")
        term.write(b"\x04")  # ^D: the shell's EOF; it exits with the last status
        code = term.wait()
        assert code == 1
        after = termios.tcgetattr(term.fd)
        assert after[3] == before[3], "the terminal's local modes were not restored"
    finally:
        try:
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(term.fd)


def test_exec_it_restores_the_terminal_when_killed_by_a_signal(sandpit, box):
    term = Pty([*sandpit.argv, "exec", "-it", box, "--", "sh"], rows=24, cols=80)
    try:
        before = termios.tcgetattr(term.fd)
        term.write(b"echo U$((2+2))\n")
        term.expect(b"U4")
        os.kill(term.pid, signal.SIGTERM)
        assert term.wait() == 128 + signal.SIGTERM
        assert termios.tcgetattr(term.fd)[3] == before[3]
    finally:
        os.close(term.fd)
    # The call's cancellation killed the shell (asynchronously: polled). Counted by
    # python, not a shell pipeline, whose own forks would count.
    count = ("import os\n"
             "def comm(p):\n"
             "    try: return open(f'/proc/{p}/comm').read().strip()\n"
             "    except OSError: return ''\n"
             "print(sum(comm(p) == 'sh' for p in os.listdir('/proc') if p.isdigit()))")
    for _ in range(600):
        left = sandpit("exec", box, "--", "python3", "-c", count).stdout.strip()
        if left == "0":
            break
        time.sleep(0.1)
    assert left == "0", left


# --------------------------------------------------------------------------- cp


def test_cp_files_both_ways_with_their_modes(sandpit, box, tmp_path: Path):
    src = tmp_path / "tool.sh"
    src.write_bytes(b"#!/bin/sh\necho tool\n" + bytes(range(256)))
    src.chmod(0o754)
    sandpit("cp", str(src), f"{box}:/opt/bin/tool.sh")
    inside = sh(sandpit, box, "stat -c %a /opt/bin/tool.sh; sha256sum < /opt/bin/tool.sh")
    mode, digest, _ = inside.stdout.split()
    assert mode == "754" and digest == hashlib.sha256(src.read_bytes()).hexdigest()
    # Into an existing directory: under its own name.
    sandpit("cp", str(src), f"{box}:/tmp")
    assert sh(sandpit, box, "stat -c %a /tmp/tool.sh").stdout == "754\n"

    sh(sandpit, box, "printf 'from inside' > /etc/made; chmod 600 /etc/made")
    back = tmp_path / "made.txt"
    sandpit("cp", f"{box}:/etc/made", str(back))
    assert back.read_bytes() == b"from inside"
    assert stat.S_IMODE(back.stat().st_mode) == 0o600
    # Into an existing local directory.
    sandpit("cp", f"{box}:etc/made", str(tmp_path))
    assert (tmp_path / "made").read_bytes() == b"from inside"


def test_cp_streams_files_above_the_message_limit(sandpit, box, tmp_path: Path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(MAX_FILE_BYTES + (4 << 20)))
    sandpit("cp", str(big), f"{box}:/tmp/big.bin")
    digest = sh(sandpit, box, "sha256sum < /tmp/big.bin").stdout.split()[0]
    assert digest == hashlib.sha256(big.read_bytes()).hexdigest()
    back = tmp_path / "back.bin"
    sandpit("cp", f"{box}:/tmp/big.bin", str(back))
    assert back.read_bytes() == big.read_bytes()


def test_cp_directories_and_tar_streams(sandpit, box, tmp_path: Path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a\n")
    (tree / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (tree / "sub" / "run.sh").chmod(0o700)
    sandpit("cp", str(tree), f"{box}:/opt/tree")  # new: becomes the copy
    sandpit("cp", str(tree), f"{box}:/opt/tree")  # existing: a child of it
    listing = sh(sandpit, box, "cd /opt/tree && find . -type f | sort; stat -c %a sub/run.sh").stdout
    assert listing.split() == ["./a.txt", "./sub/run.sh", "./tree/a.txt", "./tree/sub/run.sh", "700"]

    copy = tmp_path / "copy"
    sandpit("cp", f"{box}:/opt/tree", str(copy))
    assert (copy / "a.txt").read_text() == "a\n"
    assert stat.S_IMODE((copy / "sub" / "run.sh").stat().st_mode) == 0o700
    assert (copy / "tree" / "a.txt").is_file()

    # `-`: a tar archive to stdout, and one from stdin into a directory.
    streamed = sandpit("cp", f"{box}:/opt/tree/sub", "-", text=False, input=b"")
    with tarfile.open(fileobj=io.BytesIO(streamed.stdout)) as archive:
        assert sorted(archive.getnames()) == ["sub", "sub/run.sh"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        info = tarfile.TarInfo("piped/hello.txt")
        info.size, info.mode = 6, 0o640
        archive.addfile(info, io.BytesIO(b"hello\n"))
    sandpit("cp", "-", f"{box}:/tmp", input=buf.getvalue())
    assert sh(sandpit, box, "cat /tmp/piped/hello.txt; stat -c %a /tmp/piped/hello.txt").stdout == "hello\n640\n"


def test_cp_errors_are_clear(sandpit, box, tmp_path: Path):
    missing = sandpit("cp", f"{box}:/no/such/file", str(tmp_path / "x"), check=False)
    assert missing.returncode == 125
    assert "CWSANDBOX_FILE_NOT_FOUND" in missing.stderr and "/no/such/file" in missing.stderr, missing.stderr
    assert not (tmp_path / "x").exists()
    local = sandpit("cp", str(tmp_path / "absent"), f"{box}:/tmp/x", check=False)
    assert local.returncode == 125 and "absent" in local.stderr and "No such file" in local.stderr
    both = sandpit("cp", f"{box}:/a", f"{box}:/b", check=False)
    assert both.returncode == 125 and "between sandboxes" in both.stderr
    unknown = sandpit("cp", str(tmp_path), "sb-nope:/tmp", check=False)
    assert unknown.returncode == 125 and "CWSANDBOX_SANDBOX_NOT_FOUND" in unknown.stderr


# --------------------------------------------------------------------------- --json


def test_json_listings_match_the_daemons_view(sandpit, binaries: Binaries, server: Server, stores, tag):
    from cwsandbox import Sandbox

    ids = {sandpit("create", "--tag", tag, "python:3.11", "--", "sleep", "infinity").stdout.strip()
           for _ in range(2)}
    listed = json.loads(sandpit("ls", "--json", "--tag", tag).stdout)
    assert isinstance(listed, list)
    assert {r["id"] for r in listed} == ids
    client = {sb.sandbox_id: sb for sb in Sandbox.list(tags=[tag]).result(timeout=RPC)}
    assert set(client) == ids
    for record in listed:
        assert record["state"] == "running" and record["tags"] == [tag]
        assert record["image"] == "python:3.11" and record["exit_code"] is None
        assert record["created_at"].endswith("Z") and record["ended_at"] is None
    # An ended one shows with -a, its exit code and end time set.
    done = sandpit("create", "--tag", tag, "python:3.11", "--", "sh", "-c", "exit 5", check=False).stdout.strip()
    for _ in range(600):
        record = json.loads(sandpit("get", "--json", done).stdout)
        if record["state"] not in ("running", "creating", "pending"):
            break
        time.sleep(0.1)
    assert (record["state"], record["exit_code"]) == ("failed", 5)
    assert record["ended_at"] is not None
    everything = json.loads(sandpit("ls", "-a", "--json", "--tag", tag).stdout)
    assert {r["id"] for r in everything} == ids | {done}
    assert json.loads(sandpit("ls", "--json", "--tag", "no-such-tag-xyz").stdout) == []

    images = json.loads(subprocess.run(
        [str(binaries.sandpit), "--data-dir", str(server.data_dir), "image", "ls", "--json"],
        capture_output=True, text=True, timeout=RPC, check=True).stdout)
    by_ref = {i["reference"]: i for i in images}
    ours = by_ref["docker.io/library/python:3.11"]  # stored normalised, as Docker does
    assert "docker.io/library/python:3.15" in by_ref
    assert ours["id"].startswith("sha256:") and ours["size_bytes"] > 0 and ours["layers"] >= 1

    secrets = json.loads(stores.cli("ls", "wandb", "--json").stdout)
    assert secrets == [{"store": "wandb", "name": n} for n in stores.cli("ls", "wandb").stdout.split()]
    assert {"HF_TOKEN", "db-credentials"} <= {s["name"] for s in secrets}


# --------------------------------------------------------------------------- completions


def test_completions_are_valid_scripts(binaries: Binaries, tmp_path: Path):
    for shell in ("bash", "zsh", "fish"):
        out = subprocess.run([str(binaries.sandpit), "completions", shell],
                             capture_output=True, text=True, timeout=RPC, check=True).stdout
        for verb in ("create", "exec", "cp", "ls"):
            assert verb in out, (shell, verb)
        script = tmp_path / f"sandpit.{shell}"
        script.write_text(out)
        if shell == "bash" or shutil.which(shell):
            subprocess.run([shell, "-n", str(script)], check=True, timeout=RPC)
    # Loaded into bash, it completes the verbs.
    probe = subprocess.run(
        ["bash", "-c", f"source {tmp_path / 'sandpit.bash'}; COMP_WORDS=(sandpit cre); COMP_CWORD=1; "
         "_sandpit sandpit cre sandpit; printf '%s\\n' \"${COMPREPLY[@]}\""],
        capture_output=True, text=True, timeout=RPC, check=True)
    assert "create" in probe.stdout.split()
    bad = subprocess.run([str(binaries.sandpit), "completions", "tcsh"], capture_output=True, text=True)
    assert bad.returncode == 2
