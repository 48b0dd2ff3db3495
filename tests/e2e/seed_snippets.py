"""Finds the runnable Python snippets in the product docs under shared/seeds/.

The seed files are scraped web pages: code blocks lost their fences (and, in
the scraped GitHub review, sometimes their indentation). A snippet is found
the way a reader would copy it: it starts at an `import`/`from ... import`
line and runs over the code-looking lines after it; the longest prefix of
those lines that is valid Python and does more than import is the snippet.
Blocks that are not valid Python as scraped (a diff hunk whose indentation the
scrape flattened) are reported as fragments, not run.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def seeds_dir() -> Path:
    """`$SANDPIT_SEEDS_DIR`, else the first of ../shared/seeds, shared/seeds that exists."""
    env = os.environ.get("SANDPIT_SEEDS_DIR")
    if env:
        return Path(env)
    for candidate in (REPO_ROOT.parent / "shared" / "seeds", REPO_ROOT / "shared" / "seeds"):
        if candidate.is_dir():
            return candidate
    return REPO_ROOT.parent / "shared" / "seeds"


_START = re.compile(r"^(?:from\s+[\w.]+\s+import\s|import\s+[\w.]+)")
_CODE_LINE = re.compile(
    r"""^(?:
        \s.*                                   # indented
      | \#.*                                   # comment
      | [)\]}].*                               # closing bracket of a call
      | @\w.*                                  # decorator
      | (?:from|import|with|for|while|if|elif|else|try|except|finally|def|class|return
           |raise|assert|async|await|print|del|pass|break|continue)\b.*
      | [A-Za-z_][\w.]*\s*(?:\[.*\])?\s*(?:[-+*/]?=|\(|\.|,|:).*   # assignment / call / attribute
    )$""",
    re.VERBOSE,
)
_FENCE = re.compile(r"^\s*```")


@dataclass(frozen=True)
class Snippet:
    id: str  # "<seed prefix>-L<first line>", e.g. "000-L31"
    seed: str  # file name
    line: int  # 1-based line of the first code line
    code: str
    runnable: bool  # False: not valid Python as scraped (fragment)

    def uses(self, *names: str) -> bool:
        return any(re.search(rf"\.{re.escape(n)}\(", self.code) for n in names)


def _is_code_line(line: str) -> bool:
    return line.strip() == "" or bool(_CODE_LINE.match(line))


def _does_work(tree: ast.Module) -> bool:
    return any(not isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body)


def extract(path: Path) -> list[Snippet]:
    lines = path.read_text(encoding="utf-8").splitlines()
    prefix = path.name.split("_", 1)[0]
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        if not _START.match(lines[i]):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and _is_code_line(lines[j]) and not _FENCE.match(lines[j]):
            j += 1
        block = lines[i:j]
        best: str | None = None
        for end in range(len(block), 0, -1):
            text = "\n".join(block[:end]).rstrip() + "\n"
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue
            if _does_work(tree):
                best = text
            break
        code = best if best is not None else "\n".join(block).rstrip() + "\n"
        out.append(
            Snippet(
                id=f"{prefix}-L{i + 1}",
                seed=path.name,
                line=i + 1,
                code=code,
                runnable=best is not None,
            )
        )
        i = j
    return out


def all_snippets() -> list[Snippet]:
    out: list[Snippet] = []
    for path in sorted(seeds_dir().glob("*.txt")):
        out.extend(extract(path))
    return out


if __name__ == "__main__":  # python tests/e2e/seed_snippets.py: print what is found
    for s in all_snippets():
        kind = "RUN " if s.runnable else "FRAG"
        print(f"===== {s.id} {kind} ({s.seed}:{s.line})")
        print(s.code, end="")
