"""The documentation: generated reference pages current, links resolving, the site building strictly."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Files the project does not have (they live outside it); the docs must say what they need themselves.
FOREIGN = ("shared/", "DESIGN.md", "RUNTIMES.md", "STYLE.md")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _gen():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _links(text: str) -> list[str]:
    """Link targets in Markdown prose (not in code blocks or code spans)."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


@pytest.mark.parametrize("page", ["appliance-toml.md", "cli.md"])
def test_generated_reference_matches_the_code(page):
    want = {p.name: text for p, text in _gen().pages().items()}[page]
    have = (ROOT / "docs" / "reference" / page).read_text()
    assert have == want, f"docs/reference/{page} is stale: run `python scripts/gen_reference.py` and commit"


def test_every_config_key_is_described():
    """A key without a description fails: add a `#` comment above the field in node/config/."""
    rows = [line for line in _gen().config_page().splitlines() if line.startswith("| `")]
    assert len(rows) > 40  # every section's keys, not an empty page
    bare = [row.split("|")[1].strip() for row in rows if row.rstrip().endswith("|  |")]
    assert not bare, f"undocumented appliance.toml keys: {bare}"


def test_cli_reference_covers_every_command():
    text = _gen().cli_page()
    for cmd in ("infernode up", "infernode lock", "infernode pull", "infernode keys create",
                "infernode teams create", "infernode usage", "infernode fleet config", "infernode doctor"):
        assert f"`{cmd}`" in text, cmd
    assert "`--rpm`" in text and "`--check`" in text


def test_relative_links_point_to_files_that_exist():
    broken = []
    for doc in DOC_FILES:
        for target in _links(doc.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (http:, mailto:) or an anchor in the same page
            path = target.split("#", 1)[0]
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_link_finder_sees_links_and_skips_code():
    text = "see [a](docs/a.md) and `[b](b.md)`\n```\n[c](c.md)\n```\n![img](i.png) [d](https://x.y/z)"
    assert _links(text) == ["docs/a.md", "https://x.y/z"]


def test_docs_mention_no_file_the_project_does_not_have():
    found = [f"{doc.relative_to(ROOT)}: {word}" for doc in DOC_FILES for word in FOREIGN if word in doc.read_text()]
    assert not found, found


def test_readme_is_the_first_screen():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv .venv && "))
    assert test_command in readme, ".ci/run runs the README's test command verbatim"
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[llamacpp]' && .venv/bin/infernode up" in readme


def test_mkdocs_build_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "reference" / "appliance-toml" / "index.html").exists()
