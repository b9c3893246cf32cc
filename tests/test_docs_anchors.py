"""Every ``page.md#anchor`` link in the docs, the README and the package (the report's glossary
links its definitions this way) names a heading that exists, under GitHub's anchor rule.

Found in review: the report's links for ``loss``, ``grad_norm``, ``trace_fisher`` and four more
pointed at ``analysis.md#quantities-curvlabanalysismeasurespy``, an anchor no heading has, so
they opened the page at its top.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_LINK = re.compile(r"([A-Za-z0-9_-]+\.md)#([A-Za-z0-9_\-]+)")


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation other than ``-``/``_`` dropped, spaces
    to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#+\s+(.*)$", line)):
            found.add(_slug(m.group(1)))
    return found


def _references() -> list[tuple[str, int, str, str]]:
    files = [*DOCS.glob("*.md"), ROOT / "README.md", *(ROOT / "curvlab").rglob("*.py")]
    refs = []
    for path in files:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in _LINK.finditer(line):
                refs.append((str(path.relative_to(ROOT)), i, m.group(1), m.group(2)))
    return refs


def test_slug_rule() -> None:
    heading = "Quantities (`curvlab/analysis/_measures.py`, one registered function each)"
    assert _slug(heading) == "quantities-curvlabanalysis_measurespy-one-registered-function-each"


def test_every_anchor_link_names_a_heading() -> None:
    refs = _references()
    assert len(refs) >= 10  # the check looks at something
    pages = {p.name: _anchors(p) for p in DOCS.glob("*.md")}
    missing = [
        f"{where}:{line} {page}#{anchor}"
        for where, line, page, anchor in refs
        if page in pages and anchor not in pages[page]
    ]
    assert not missing, "links to headings that do not exist: " + "; ".join(missing)


def test_every_glossary_link_resolves() -> None:
    from curvlab.analysis._glossary import QUANTITY_INFO

    for name, info in QUANTITY_INFO.items():
        page, _, anchor = info.doc.partition("#")
        assert (DOCS / page).exists(), (name, info.doc)
        assert not anchor or anchor in _anchors(DOCS / page), (name, info.doc)
