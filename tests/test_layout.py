"""The tree's shape: modules stay small, and docs/dev/architecture.md names every one of them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 450
# `node/supply/{pull,download}.py` names two modules; `node/app.py` one.
_NAMED = re.compile(r"\b((?:node|runtimes)(?:/[\w]+)*)/(?:\{([\w,]+)\}|(\w+))\.py\b")


def modules() -> list[str]:
    """Every Python module of node/ and runtimes/ (package __init__ files aside), as repository paths."""
    return sorted(str(p.relative_to(REPO)) for root in ("node", "runtimes") for p in (REPO / root).rglob("*.py")
                  if p.name != "__init__.py")


def named_in(text: str) -> set[str]:
    """The module paths a page names, brace groups expanded."""
    found = set()
    for m in _NAMED.finditer(text):
        for name in (m.group(2).split(",") if m.group(2) else [m.group(3)]):
            found.add(f"{m.group(1)}/{name}.py")
    return found


def test_no_module_passes_450_lines():
    long = {path: n for path in modules() if (n := len((REPO / path).read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def test_architecture_page_names_every_module():
    page = (REPO / "docs/dev/architecture.md").read_text()
    missing = [m for m in modules() if m not in named_in(page)]
    assert not missing, ("docs/dev/architecture.md does not name these modules in the flow they belong to "
                         f"(write each as its path, e.g. node/gateway/admit.py): {', '.join(missing)}")


def test_the_checks_see_what_they_check():
    """The name finder expands brace groups and full paths, and the module list is the real tree."""
    assert named_in("x node/supply/{pull,download}.py and runtimes/vllm.py; node/app.py") == {
        "node/supply/pull.py", "node/supply/download.py", "runtimes/vllm.py", "node/app.py"}
    assert "node/gateway/relay.py" in modules() and "node/__init__.py" not in modules()
