"""Runs one docs snippet file unmodified (as __main__), like `python snippet.py`.

On an uncaught exception it adds one line to stderr before the traceback,
`SNIPPET-ERROR: <class> reason=<ErrorInfo reason> code=<gRPC code> | ...`
for the exception and its causes, because the client's tracebacks do not show
the structured reason (e.g. CWSANDBOX_NOT_IMPLEMENTED) that test_seeds.py uses
to tell a data-plane gap from any other failure.
"""

import runpy
import sys


def _describe(exc: BaseException) -> str:
    parts = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = None
        code_fn = getattr(exc, "code", None)
        if callable(code_fn):
            try:
                code = code_fn()
            except Exception:  # noqa: BLE001
                code = None
        parts.append(
            f"{type(exc).__module__}.{type(exc).__qualname__} "
            f"reason={getattr(exc, 'reason', None)!r} code={code} msg={str(exc)[:300]!r}"
        )
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


def main() -> None:
    path = sys.argv[1]
    sys.argv = [path]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:
        print(f"SNIPPET-ERROR: {_describe(exc)}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    main()
