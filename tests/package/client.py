"""The real cwsandbox client against the packaged daemon, run by test_package.py
in the booted machine's network namespace (CWSANDBOX_BASE_URL and
CWSANDBOX_API_KEY come from the test).

    client.py create IMAGE   -> prints the new sandbox's id (RUNNING, exec'd)
    client.py check ID       -> the sandbox is RUNNING and answers an exec
    client.py delete ID      -> stopped and TERMINATED
"""

from __future__ import annotations

import json
import sys

from cwsandbox import Sandbox, SandboxStatus

RPC = 120


def probe(sb: Sandbox) -> dict:
    """What the sandbox says about itself: its id, its network, its PID 1."""
    res = sb.exec(["sh", "-c", "hostname; ip -o -4 addr show scope global; cat /proc/1/cmdline"]).result(
        timeout=RPC
    )
    assert res.returncode == 0, res.stderr
    return {"id": sb.sandbox_id, "status": str(sb.status), "stdout": res.stdout}


def main() -> None:
    verb, arg = sys.argv[1], sys.argv[2]
    if verb == "create":
        sb = Sandbox.run(container_image=arg)
        sb.wait()
        assert sb.status == SandboxStatus.RUNNING, sb.status
        print(json.dumps(probe(sb)))
    elif verb == "check":
        sb = Sandbox.from_id(arg).result(timeout=RPC)
        assert sb.status == SandboxStatus.RUNNING, sb.status
        print(json.dumps(probe(sb)))
    elif verb == "delete":
        sb = Sandbox.from_id(arg).result(timeout=RPC)
        sb.stop(missing_ok=True).result(timeout=RPC)
        again = Sandbox.from_id(arg).result(timeout=RPC)
        assert again.status == SandboxStatus.TERMINATED, again.status
        print(json.dumps({"id": arg, "status": str(again.status)}))
    else:
        raise SystemExit(f"unknown verb {verb}")


if __name__ == "__main__":
    main()
