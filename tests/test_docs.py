"""The README stays a five-minute read that names the commands CI runs, its links lead somewhere,
and dated measurements live in BENCHMARKS.md. (docs/ itself is checked by `mkdocs build --strict`
in ci/test.sh: broken links, anchors, pages missing from the nav.)"""

from __future__ import annotations

import re

import yaml

from helpers import REPO

README = (REPO / "README.md").read_text()


def test_readme_is_short_and_names_the_set_up_and_test_commands():
    assert len(README.splitlines()) <= 200
    assert "bash ci/install.sh && .venv/bin/dualtune run recipes/minilm_demo.yaml --backend torch" in README
    assert "\n    bash ci/test.sh\n" in README
    assert "exec bash ci/test.sh" in (REPO / ".ci" / "run").read_text()  # what CI runs is what it names


def test_readme_holds_no_dated_measurement():
    assert re.findall(r"\b20\d\d-\d\d-\d\d\b", README) == []


def test_readme_links_lead_to_files_and_every_docs_page_is_in_the_nav():
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert targets, "the README links to docs/"
    assert [t for t in targets if not (REPO / t).exists()] == []
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    in_nav = {page for entry in nav for page in entry.values()}
    assert in_nav == {p.name for p in (REPO / "docs").glob("*.md")}
    assert {f"docs/{p}" for p in in_nav} - {"docs/index.md"} <= set(targets)  # the README links every page
