"""Issue 5 acceptance: sandboxes from images pulled out of real OCI registries.

Real parts only: Debian's `docker-registry` (distribution 2.8) on free loopback
ports, images pushed into it by `skopeo`, a `sandpitd` of its own (fresh data
dir, so every image here is really pulled) whose config lists the registries,
and the real `cwsandbox` client. Traffic never leaves loopback: `docker.io` is
served by a loopback mirror, and only images the mirror has are asked for.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cwsandbox import (
    AuthHeaders,
    ImagePullCredentials,
    Sandbox,
    SandboxDefaults,
    SandboxStatus,
)
from cwsandbox.exceptions import SandboxFailedError

from conftest import (
    REPO_ROOT,
    Binaries,
    E2EDirs,
    Principal,
    Server,
    free_port,
    mounts_under,
    sweep,
)

RPC = 120  # seconds: a pull is part of the first wait
BUSYBOX_TAR = REPO_ROOT / ".cache" / "images" / "busybox.tar"
PRIVATE_USER = "puller"
PRIVATE_PASSWORD = "s3cret-token"


# --------------------------------------------------------------------------- registries


@dataclass
class Registry:
    """A `docker-registry` process on 127.0.0.1:port."""

    port: int
    root: Path
    log_path: Path
    proc: subprocess.Popen

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_registry(root: Path, htpasswd: Path | None = None) -> Registry:
    root.mkdir(parents=True)
    port = free_port()
    auth = ""
    if htpasswd is not None:
        auth = f"auth:\n  htpasswd:\n    realm: sandpit-e2e\n    path: {htpasswd}\n"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: sandpit-e2e\n"
        + auth
    )
    log_path = root / "registry.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    registry = Registry(port=port, root=root, log_path=log_path, proc=proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"docker-registry exited: {registry.log()}", pytrace=False)
        try:
            urllib.request.urlopen(f"http://{registry.host}/v2/", timeout=1)
            return registry
        except urllib.error.HTTPError:
            return registry  # 401 from an htpasswd registry: it is up
        except OSError:
            time.sleep(0.05)
    registry.stop()
    pytest.fail(f"docker-registry did not come up: {registry.log()}", pytrace=False)


def skopeo_push(rootfs_tar: Path, destination: str, creds: str | None = None) -> None:
    """Pushes a rootfs tarball as a one-layer image (skopeo's `tarball:` transport)."""
    cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if creds:
        cmd += ["--dest-creds", creds]
    cmd += [f"tarball:{rootfs_tar}", f"docker://{destination}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"


def bcrypt_htpasswd(path: Path, user: str, password: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # libxcrypt's bcrypt; distribution only accepts bcrypt

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    assert hashed.startswith("$2"), hashed
    path.write_text(f"{user}:{hashed}\n")


@dataclass
class Registries:
    public: Registry
    private: Registry


@pytest.fixture(scope="module")
def registries(e2e_dirs: E2EDirs) -> Iterator[Registries]:
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: run scripts/install-deps.sh", pytrace=False)
    if not BUSYBOX_TAR.is_file():
        pytest.fail(f"{BUSYBOX_TAR} missing: run scripts/build-test-images.sh", pytrace=False)
    base = e2e_dirs.root / "registries"
    public = start_registry(base / "public")
    htpasswd = base / "htpasswd"
    base.mkdir(exist_ok=True)
    bcrypt_htpasswd(htpasswd, PRIVATE_USER, PRIVATE_PASSWORD)
    private = start_registry(base / "private", htpasswd=htpasswd)
    try:
        skopeo_push(BUSYBOX_TAR, f"{public.host}/tools/busybox:1")
        skopeo_push(BUSYBOX_TAR, f"{public.host}/tools/busybox:shared")
        skopeo_push(BUSYBOX_TAR, f"{public.host}/tools/busybox:cli")
        # A layer no other image shares (for the lease test).
        unique = base / "unique.tar"
        shutil.copyfile(BUSYBOX_TAR, unique)
        with tarfile.open(unique, mode="a", format=tarfile.GNU_FORMAT) as tar:
            data = b"only in this image\n"
            info = tarfile.TarInfo("./etc/unique-marker")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        skopeo_push(unique, f"{public.host}/tools/unique:1")
        # What the docker.io mirror serves: docker.io/library/busybox:1.36.
        skopeo_push(BUSYBOX_TAR, f"{public.host}/library/busybox:1.36")
        skopeo_push(
            BUSYBOX_TAR,
            f"{private.host}/team/tool:2",
            creds=f"{PRIVATE_USER}:{PRIVATE_PASSWORD}",
        )
        yield Registries(public=public, private=private)
    finally:
        public.stop()
        private.stop()


# --------------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def pull_server(
    binaries: Binaries,
    registries: Registries,
    e2e_dirs: E2EDirs,
    principal_a: Principal,
) -> Iterator[Server]:
    root = e2e_dirs.root / "pulls"
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    secrets = root / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "private-registry").write_text(f"{PRIVATE_USER}:{PRIVATE_PASSWORD}\n")
    config = root / "sandpitd.toml"
    config.write_text(
        f'[registry.registries."{registries.public.host}"]\n'
        "insecure = true\n"
        f'[registry.registries."{registries.private.host}"]\n'
        "insecure = true\n"
        '[registry.registries."docker.io"]\n'
        f'mirrors = ["http://{registries.public.host}"]\n'
        "[secret_stores.local]\n"
        f'dir = "{secrets}"\n'
        # A second daemon on the host: the session daemon owns the default network
        # layout (links, table, ports), and pulls need none.
        "[network]\nenabled = false\n"
    )
    baseline_mounts = set(mounts_under(root))
    srv = Server(
        binary=binaries.sandpitd,
        data_dir=data_dir,
        keys=[principal_a.key],
        log_path=root / "sandpitd.log",
        config=config,
    )
    srv.start()
    yield srv
    problems = []
    try:
        sweep(srv, [principal_a])
    except AssertionError as e:
        problems.append(str(e))
    code = srv.stop()
    if code != 0:
        problems.append(f"sandpitd exited with {code}")
    leftover = [m for m in mounts_under(root) if m not in baseline_mounts]
    if leftover:
        problems.append("mounts left: " + "\n".join(leftover))
    if problems:
        e2e_dirs.keep = True
        raise AssertionError("\n".join(problems) + "\n" + srv.log_tail(80))


@pytest.fixture
def auth(principal_a: Principal) -> AuthHeaders:
    return principal_a.bearer


def run(server: Server, auth: AuthHeaders, image: str, **kwargs) -> Sandbox:
    return Sandbox.run(
        container_image=image,
        defaults=SandboxDefaults(base_url=server.url),
        auth=auth,
        **kwargs,
    )


def store_dir(server: Server) -> Path:
    return server.data_dir / "store"


def staging_is_empty(server: Server) -> bool:
    return not any((store_dir(server) / "tmp").iterdir())


def sandpit(binaries: Binaries, server: Server, *args: str, input: str | None = None):
    return subprocess.run(
        [str(binaries.sandpit), "--data-dir", str(server.data_dir), *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
    )


def blob_gets(registry: Registry, repository: str) -> int:
    """GETs of layer/config blobs of `repository` in the registry's access log."""
    return len(re.findall(rf'"GET /v2/{re.escape(repository)}/blobs/sha256:', registry.log()))


# --------------------------------------------------------------------------- tests


def test_sandbox_runs_from_an_image_pulled_from_a_registry(pull_server, registries, auth, binaries):
    image = f"{registries.public.host}/tools/busybox:1"
    sb = run(pull_server, auth, image)
    try:
        sb.wait()
        assert sb.status == SandboxStatus.RUNNING
        result = sb.exec(["sh", "-c", "echo pulled; ls /bin/busybox; id -u"]).result(timeout=RPC)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["pulled", "/bin/busybox", "0"]
    finally:
        sb.stop().result(timeout=RPC)
    listing = sandpit(binaries, pull_server, "image", "ls")
    assert listing.returncode == 0, listing.stderr
    line = next(l for l in listing.stdout.splitlines() if l.startswith(image + " "))
    assert re.search(r"\s1\s+\d+(\.\d)? (KiB|MiB)$", line), line
    assert staging_is_empty(pull_server)


def test_docker_io_is_served_by_the_configured_mirror(pull_server, registries, auth, binaries):
    sb = run(pull_server, auth, "busybox:1.36")
    try:
        sb.wait()
        result = sb.exec(["busybox", "echo", "from the mirror"]).result(timeout=RPC)
        assert result.stdout == "from the mirror\n"
    finally:
        sb.stop().result(timeout=RPC)
    assert '"GET /v2/library/busybox/manifests/1.36' in registries.public.log()
    listing = sandpit(binaries, pull_server, "image", "ls").stdout
    assert "docker.io/library/busybox:1.36 " in listing


def test_concurrent_sandboxes_of_one_new_image_share_one_pull(pull_server, registries, auth):
    image = f"{registries.public.host}/tools/busybox:shared"
    before = blob_gets(registries.public, "tools/busybox")
    boxes = [run(pull_server, auth, image) for _ in range(4)]
    try:
        for sb in boxes:
            sb.wait()
            assert sb.status == SandboxStatus.RUNNING
            assert sb.exec(["true"]).result(timeout=RPC).returncode == 0
    finally:
        for sb in boxes:
            sb.stop().result(timeout=RPC)
    # The layer is already stored (same content as :1), so at most the config
    # blob is fetched, once for all four sandboxes.
    assert blob_gets(registries.public, "tools/busybox") - before <= 1


def test_missing_tag_fails_the_sandbox_with_a_reason(pull_server, registries, auth):
    sb = run(pull_server, auth, f"{registries.public.host}/tools/busybox:no-such-tag")
    with pytest.raises(SandboxFailedError) as failed:
        sb.wait()
    message = str(failed.value)
    assert "no-such-tag" in message and "not found" in message, message
    assert staging_is_empty(pull_server)


def test_unreachable_registry_fails_the_sandbox_with_a_reason(pull_server, auth):
    closed = free_port()
    sb = run(pull_server, auth, f"127.0.0.1:{closed}/x/y:1")
    with pytest.raises(SandboxFailedError) as failed:
        sb.wait()
    assert "unreachable" in str(failed.value), str(failed.value)


def test_private_registry_needs_the_pull_credentials(pull_server, registries, auth):
    image = f"{registries.private.host}/team/tool:2"
    denied = run(pull_server, auth, image)
    with pytest.raises(SandboxFailedError) as failed:
        denied.wait()
    assert "unauthorized" in str(failed.value), str(failed.value)

    sb = run(
        pull_server,
        auth,
        image,
        image_pull_credentials=ImagePullCredentials(
            registry=registries.private.host, store="local", name="private-registry"
        ),
    )
    try:
        sb.wait()
        assert sb.status == SandboxStatus.RUNNING
        assert sb.exec(["echo", "private"]).result(timeout=RPC).stdout == "private\n"
    finally:
        sb.stop().result(timeout=RPC)


def test_cli_pull_ls_rm_gc(pull_server, registries, binaries):
    image = f"{registries.public.host}/tools/busybox:cli"
    config = pull_server.config
    pulled = sandpit(binaries, pull_server, "image", "pull", "--config", str(config), image)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith(image + "  "), pulled.stdout
    assert "1 layers" in pulled.stdout
    # Not a terminal: one line per layer, no progress bar escapes.
    assert "\x1b[" not in pulled.stderr
    assert re.search(r"resolved sha256:[0-9a-f]{64} from http://127\.0\.0\.1:\d+: 1 layers", pulled.stderr)

    # On a terminal (script(1) gives it a pty): a progress bar of bytes and layers.
    removed = sandpit(binaries, pull_server, "image", "rm", image)
    assert removed.returncode == 0, removed.stderr
    command = " ".join(
        [str(binaries.sandpit), "--data-dir", str(pull_server.data_dir), "image", "pull"]
        + ["--config", str(config), image]
    )
    tty = subprocess.run(
        ["script", "-qec", command, "/dev/null"], capture_output=True, text=True, timeout=120
    )
    assert tty.returncode == 0, tty.stdout + tty.stderr
    bar = r"\x1b\[2K\[[#.]{30}\] [\d.]+ (B|KiB|MiB) / [\d.]+ (B|KiB|MiB)  [01]/1 layers"
    assert re.search(bar, tty.stdout), repr(tty.stdout)

    missing = sandpit(
        binaries, pull_server, "image", "pull", "--config", str(config), image + "-nope"
    )
    assert missing.returncode != 0
    assert "not found" in missing.stderr, missing.stderr

    removed = sandpit(binaries, pull_server, "image", "rm", image)
    assert removed.returncode == 0, removed.stderr
    assert image not in sandpit(binaries, pull_server, "image", "ls").stdout
    gc = sandpit(binaries, pull_server, "image", "gc")
    assert gc.returncode == 0, gc.stderr
    assert gc.stdout.strip().endswith("layers removed"), gc.stdout


def layer_dirs(server: Server) -> set[str]:
    return {p.name for p in (store_dir(server) / "layers" / "sha256").iterdir()}


def test_a_running_sandbox_keeps_its_layers_through_image_rm_and_gc(
    pull_server, registries, auth, binaries
):
    image = f"{registries.public.host}/tools/unique:1"
    before = layer_dirs(pull_server)
    sb = run(pull_server, auth, image)
    try:
        sb.wait()
        added = layer_dirs(pull_server) - before
        assert len(added) == 1, added
        # Removing the image and collecting garbage while the sandbox runs
        # must leave its (leased) layer in place: the sandbox keeps working.
        assert sandpit(binaries, pull_server, "image", "rm", image).returncode == 0
        gc = sandpit(binaries, pull_server, "image", "gc")
        assert gc.returncode == 0, gc.stderr
        assert added <= layer_dirs(pull_server)
        result = sb.exec(["sh", "-c", "cat /etc/unique-marker && ls /bin/busybox"]).result(
            timeout=RPC
        )
        assert result.stdout == "only in this image\n/bin/busybox\n", result.stderr
    finally:
        sb.stop().result(timeout=RPC)
    # Stopped: the lease is gone, and the next gc collects the layer.
    gc = sandpit(binaries, pull_server, "image", "gc")
    assert gc.returncode == 0, gc.stderr
    assert f"removed layer sha256:{next(iter(added))}" in gc.stdout, gc.stdout
    assert not (added & layer_dirs(pull_server))
