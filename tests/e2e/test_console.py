"""The web console (issue 16, item 5): a daemon of our own with `[console]` on, sandboxes
created through the real `cwsandbox` client, and headless Chromium (Debian's `chromium`
and `chromium-driver`, through selenium) driving the REAL page: login, the principal's
table, filters, live logs, the terminal. With the flag off, nothing listens.

Screenshots of every flow are kept under target/test-artifacts/console/ (or
$SANDPIT_ARTIFACTS_DIR); their paths are printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Server, free_port, import_test_images, sweep

RPC = 120
# How long the page may take to show what the daemon already has (the table refreshes
# every 2 s). Only an upper bound for a wait, never a measured duration.
UI_WAIT = 60

ARTIFACTS = Path(
    os.environ.get("SANDPIT_ARTIFACTS_DIR") or REPO_ROOT / "target" / "test-artifacts" / "console"
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

LATE_LINE = "console-late-line"
# Prints a line at once, and another only once /tmp/go exists: the test creates it after
# the logs pane is open, so the second line can only arrive through the live stream.
LOGGER = f"echo console-start; while [ ! -e /tmp/go ]; do sleep 0.2; done; echo {LATE_LINE}; exec sleep 3600"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def console(binaries, e2e_dirs, principal_a, principal_b):
    """Our own daemon (no network, no storage) with the console on a free port."""
    # Short paths: agent sockets live under the data dir (107-byte limit).
    root = Path(tempfile.mkdtemp(prefix="spcon-", dir="/tmp"))
    data = root / "data"
    import_test_images(binaries, e2e_dirs.root, data)
    console_port = free_port()
    config = root / "sandpitd.toml"
    config.write_text(
        "[network]\nenabled = false\n[storage]\nenabled = false\n"
        f'[console]\nenabled = true\nlisten = "127.0.0.1:{console_port}"\n'
    )
    srv = Server(
        binary=binaries.sandpitd,
        data_dir=data,
        keys=[principal_a.key, principal_b.key],
        log_path=root / "sandpitd.log",
        config=config,
    )
    srv.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CWSANDBOX_BASE_URL", srv.url)
        mp.setenv("CWSANDBOX_API_KEY", principal_a.key)
        yield srv, f"http://127.0.0.1:{console_port}"
        try:
            if srv.alive():
                sweep(srv, [principal_a, principal_b])
                assert srv.stop() == 0
        finally:
            if srv.alive():
                srv.kill9()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def boxes(console, principal_b):
    """A's sandboxes (a logger, an idle one, one that completed) and one of B's."""
    import cwsandbox

    tag = f"console-{secrets.token_hex(3)}"
    logger = cwsandbox.Sandbox.run("sh", "-c", LOGGER, tags=[tag, "web"])
    idle = cwsandbox.Sandbox.run("sleep", "3600", tags=[tag, "db"])
    done = cwsandbox.Sandbox.run("true", tags=[tag, "batch"])
    theirs = cwsandbox.Sandbox.run("sleep", "3600", tags=[tag, "web"], auth=principal_b.bearer)
    for sb in (logger, idle, theirs):
        sb.wait(timeout=RPC)
    done.wait_until_complete(timeout=RPC).result(timeout=RPC)
    return {"logger": logger, "idle": idle, "done": done, "theirs": theirs, "tag": tag}


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} missing: run scripts/install-deps.sh", pytrace=False)
    profile = tempfile.mkdtemp(prefix="spcon-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def shot(browser, capsys, request):
    """Saves a screenshot of the page as a test artefact and prints its path."""

    def take(name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{request.node.name}-{name}.png"
        assert browser.save_screenshot(str(path)), f"screenshot {path} failed"
        with capsys.disabled():
            print(f"\nconsole screenshot: {path}")
        return path

    return take


# --------------------------------------------------------------------------- helpers


def wait(browser, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, UI_WAIT, poll_frequency=0.1).until(lambda d: condition(d))
    except Exception as e:  # TimeoutException: say what was on the page
        raise AssertionError(f"{message}; page text:\n{browser.find_element('tag name', 'body').text}") from e


def text_of(browser, element_id: str) -> str:
    return browser.execute_script(f"return document.getElementById({element_id!r}).textContent")


def visible(browser, element_id: str) -> bool:
    return browser.execute_script(f"return !document.getElementById({element_id!r}).hidden")


def listed(browser) -> set[str]:
    return set(
        browser.execute_script(
            "return Array.from(document.querySelectorAll('#sandboxes tbody tr')).map(r => r.dataset.id)"
        )
    )


def table_shows(browser, ids: set[str]) -> bool:
    return listed(browser) == ids


def sign_in(browser, url: str, key: str) -> None:
    browser.get(url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(url + "/")
    wait(browser, lambda d: visible(d, "login"), "the login form is not shown")
    field = browser.find_element("id", "key")
    field.clear()
    field.send_keys(key)
    browser.find_element("id", "login-button").click()


def set_filter(browser, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    el = browser.find_element("id", element_id)
    if el.tag_name == "select":
        Select(el).select_by_value(value)
    else:
        el.clear()
        if value:
            el.send_keys(value)
        else:  # clear() fires no input event
            browser.execute_script(
                "arguments[0].dispatchEvent(new Event('input'))", el
            )


def http(url: str, headers: dict[str, str] | None = None):
    """Status, headers (case-insensitive) and body."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def terminal_text(browser) -> str:
    return browser.execute_script(
        "const r = document.querySelector('#terminal .xterm-rows'); return r ? r.innerText : ''"
    )


# --------------------------------------------------------------------------- flows


def test_a_wrong_key_is_refused(console, boxes, browser, shot, principal_a):
    _, url = console
    sign_in(browser, url, "not-a-key-" + secrets.token_hex(8))
    wait(browser, lambda d: "not accepted" in text_of(d, "login-error"), "no refusal shown")
    assert not visible(browser, "app")
    assert listed(browser) == set()
    shot("refused")
    # The API behind the page: 401 without a key and with a wrong one, 200 with the right one.
    assert http(url + "/api/sandboxes")[0] == 401
    status, headers, _ = http(url + "/api/sandboxes", {"Authorization": "Bearer wrong"})
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    status, _, body = http(url + "/api/whoami", {"Authorization": f"Bearer {principal_a.key}"})
    assert status == 200 and json.loads(body)["principal"].startswith("key-")


def test_the_page_is_served_with_security_headers(console):
    _, url = console
    status, headers, body = http(url + "/")
    assert status == 200 and b'<script src="/app.js"' in body
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert not any(h.lower().startswith("access-control-") for h in headers.keys())
    # No inline script anywhere in the page.
    assert b"<script>" not in body and b"onclick" not in body


def test_the_table_lists_exactly_the_principals_sandboxes(console, boxes, browser, shot, principal_a):
    _, url = console
    mine_active = {boxes["logger"].sandbox_id, boxes["idle"].sandbox_id}
    sign_in(browser, url, principal_a.key)
    wait(browser, lambda d: visible(d, "app"), "the right key was not accepted")
    wait(browser, lambda d: table_shows(d, mine_active), f"the table does not show {mine_active}")
    assert boxes["theirs"].sandbox_id not in listed(browser)
    row = browser.find_element("css selector", f"tr[data-id='{boxes['idle'].sandbox_id}']")
    cells = [c.text for c in row.find_elements("tag name", "td")]
    assert cells[1] == "running" and "python" in cells[2], cells
    assert "db" in cells[3] and boxes["tag"] in cells[3], cells
    # The daemon's default resources: a request and a limit of each.
    assert cells[4] == "50m / 1" and cells[5] == "128Mi / 1Gi", cells
    shot("listed")
    set_filter(browser, "filter-state", "all")
    everything = mine_active | {boxes["done"].sandbox_id}
    wait(browser, lambda d: table_shows(d, everything), "state 'all' does not add the completed one")
    assert boxes["theirs"].sandbox_id not in listed(browser)
    shot("listed-all")


def test_filters_narrow_the_table(console, boxes, browser, shot, principal_a):
    _, url = console
    sign_in(browser, url, principal_a.key)
    logger, idle, done = (boxes[k].sandbox_id for k in ("logger", "idle", "done"))
    wait(browser, lambda d: table_shows(d, {logger, idle}), "the table is not filled")
    set_filter(browser, "filter-tag", "web")
    wait(browser, lambda d: table_shows(d, {logger}), "tag 'web' does not narrow to the logger")
    shot("tag")
    set_filter(browser, "filter-tag", "")
    set_filter(browser, "filter-state", "completed")
    wait(browser, lambda d: table_shows(d, {done}), "state 'completed' does not narrow to it")
    shot("state")
    set_filter(browser, "filter-state", "active")
    set_filter(browser, "filter-text", idle[:8])
    wait(browser, lambda d: table_shows(d, {idle}), "the text filter does not narrow to the id")
    shot("text")


def open_detail(browser, url: str, key: str, sandbox_id: str) -> None:
    sign_in(browser, url, key)
    wait(browser, lambda d: sandbox_id in listed(d), f"{sandbox_id} is not listed")
    browser.find_element("css selector", f"tr[data-id='{sandbox_id}']").click()
    wait(browser, lambda d: visible(d, "detail"), "the detail pane did not open")


def test_live_logs_show_a_line_printed_after_the_pane_opened(console, boxes, browser, shot, principal_a):
    _, url = console
    logger = boxes["logger"]
    open_detail(browser, url, principal_a.key, logger.sandbox_id)
    wait(browser, lambda d: text_of(d, "logs-status") == "following", "the logs are not followed")
    wait(browser, lambda d: "console-start" in text_of(d, "logs"), "the kept output is not shown")
    assert LATE_LINE not in text_of(browser, "logs")
    r = logger.exec(["touch", "/tmp/go"]).result(timeout=RPC)
    assert r.returncode == 0, r
    wait(browser, lambda d: LATE_LINE in text_of(d, "logs"), "the line printed later never arrived")
    shot("logs")


def test_the_terminal_runs_commands_in_a_pty(console, boxes, browser, shot, principal_a):
    from selenium.webdriver.common.action_chains import ActionChains

    _, url = console
    open_detail(browser, url, principal_a.key, boxes["idle"].sandbox_id)
    browser.find_element("id", "term-start").click()
    wait(browser, lambda d: text_of(d, "term-status") == "connected", "the terminal did not connect")
    terminal = browser.find_element("id", "terminal")
    # Typed as keystrokes into xterm.js, as a user would.
    ActionChains(browser).click(terminal).send_keys("echo $((6*7))\n").perform()
    wait(
        browser,
        lambda d: any(line.strip() == "42" for line in terminal_text(d).splitlines()),
        "the shell's 42 is not on the terminal",
    )
    ActionChains(browser).send_keys("tty\n").perform()
    wait(browser, lambda d: "/dev/pts/" in terminal_text(d), "tty does not name a pts")
    shot("terminal")
    ActionChains(browser).send_keys("exit\n").perform()
    wait(browser, lambda d: text_of(d, "term-status") == "exited with 0", "the shell's exit is not shown")


def test_websockets_from_another_origin_are_refused(console):
    _, url = console
    port = int(url.rsplit(":", 1)[1])
    request = (
        "GET /api/ws/terminal HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {origin}\r\n\r\n"
    )

    def status(origin: str) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(request.format(port=port, origin=origin).encode())
            return s.recv(4096).decode(errors="replace").split("\r\n", 1)[0]

    assert " 403 " in status("http://evil.example"), status("http://evil.example")
    assert " 101 " in status(f"http://127.0.0.1:{port}")


def test_with_the_flag_off_nothing_listens(binaries, principal_a):
    root = Path(tempfile.mkdtemp(prefix="spcon-off-", dir="/tmp"))
    port = free_port()
    config = root / "sandpitd.toml"
    # The address is configured, the console is not enabled.
    config.write_text(
        "[network]\nenabled = false\n[storage]\nenabled = false\n"
        f'[console]\nlisten = "127.0.0.1:{port}"\n'
    )
    srv = Server(
        binary=binaries.sandpitd,
        data_dir=root / "data",
        keys=[principal_a.key],
        log_path=root / "sandpitd.log",
        config=config,
    )
    try:
        srv.start()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
        ours = [line.split()[3] for line in out.splitlines() if f"pid={srv.pid}," in line]
        assert ours == [f"127.0.0.1:{srv.port}"], ours
    finally:
        if srv.alive():
            assert srv.stop() == 0
        shutil.rmtree(root, ignore_errors=True)
