"""MkDocs hook: links written for the repository, pointed at the site's pages.

The site includes README.md's sections and whole files (BENCHMARKS.md, RELIABILITY.md) with
pymdownx.snippets, and their links were written for the repository: `BENCHMARKS.md`, `docs/drift.md`,
`#the-compiled-scorer` (a README section that may now be on another page), `../README.md#...` from a page in
docs/. Where such a link names a file or a README section that a page of the site includes, it is pointed at
that page; anything else is left as it is, and the strict build refuses it if it leads nowhere.
"""

from __future__ import annotations

import posixpath
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from markdown import Extension, Markdown
from markdown.extensions.toc import slugify
from markdown.treeprocessors import Treeprocessor
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOCS = "docs"
# `--8<-- "FILE"` or `--8<-- "FILE:section"` on a line of its own.
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::(?P<section>[a-z][-_0-9a-z]*))?"\s*$', re.MULTILINE)
HEADING = re.compile(r"^#{1,6} +(?P<title>.+?) *#*$")
FENCE = re.compile(r"^ *(```|~~~)")


class Site:
    """Where the site shows each included file and each heading of an included section."""

    def __init__(self) -> None:
        self.page_of_file: dict[str, str] = {}  # repository path included whole -> page (docs-relative)
        self.page_of_anchor: dict[tuple[str, str], str] = {}  # (repository path, heading anchor) -> page
        self.current_page = ""

    def learn(self, files: Files) -> None:
        """Read again at every build (`make docs` rebuilds in the same process)."""
        self.page_of_file.clear()
        self.page_of_anchor.clear()
        for file in files.documentation_pages():
            for match in SNIPPET.finditer(file.content_string):
                path, section = match["path"], match["section"]
                if not (PROJECT_ROOT / path).is_file():
                    continue  # pymdownx.snippets refuses it, naming it
                content = (PROJECT_ROOT / path).read_text(encoding="utf-8")
                if section is None:
                    self.page_of_file[path] = file.src_uri
                else:
                    content = section_text(content, section)
                for anchor in heading_anchors(content):
                    self.page_of_anchor.setdefault((path, anchor), file.src_uri)

    def target(self, href: str, anchors_here: set[str]) -> str | None:
        """The site's address for a repository link, or None to keep it as it is."""
        path, _, anchor = href.partition("#")
        if re.match(r"^[a-z][a-z0-9+.-]*:|^//", href) or (not path and anchor in anchors_here):
            return None
        page = self._page_of_anchor(anchor) if not path else self._page_of_path(path, anchor)
        return None if page is None else self._relative(page, anchor)

    def _page_of_path(self, path: str, anchor: str) -> str | None:
        # Relative to the page's own file, as in docs/, or to the project root, as in README.md.
        page_dir = posixpath.dirname(posixpath.join(DOCS, self.current_page))
        for repo_path in (posixpath.normpath(posixpath.join(page_dir, path)), posixpath.normpath(path)):
            if repo_path.startswith(f"{DOCS}/") and (PROJECT_ROOT / repo_path).is_file():
                return repo_path.removeprefix(f"{DOCS}/")
            if (repo_path, anchor) in self.page_of_anchor:
                return self.page_of_anchor[repo_path, anchor]
            if repo_path in self.page_of_file:
                return self.page_of_file[repo_path]
        return None

    def _page_of_anchor(self, anchor: str) -> str | None:
        """The page that shows an included heading with this anchor, if exactly one does."""
        pages = {page for (_, known), page in self.page_of_anchor.items() if known == anchor}
        return pages.pop() if len(pages) == 1 else None

    def _relative(self, page: str, anchor: str) -> str:
        address = posixpath.relpath(page, posixpath.dirname(self.current_page) or ".")
        if address == posixpath.basename(self.current_page) and anchor:
            address = ""
        return f"{address}#{anchor}" if anchor else address


def section_text(content: str, section: str) -> str:
    """The text between a section's markers; empty when there is no such section (pymdownx.snippets refuses
    it, naming it)."""
    _, _, after_start = content.partition(f"[start:{section}]")
    return after_start.partition(f"[end:{section}]")[0]


def heading_anchors(content: str) -> list[str]:
    """The anchors Python-Markdown's toc gives the headings of this Markdown (code blocks skipped)."""
    anchors, in_code = [], False
    for line in content.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and (heading := HEADING.match(line)):
            title = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading["title"])
            anchors.append(slugify(title, "-"))
    return anchors


SITE = Site()


class RepoLinks(Treeprocessor):
    def run(self, root: ET.Element) -> None:
        anchors_here = {element.get("id", "") for element in root.iter()}
        for link in root.iter("a"):
            target = SITE.target(link.get("href", ""), anchors_here)
            if target is not None:
                link.set("href", target)


class RepoLinksExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802 (Python-Markdown's name)
        # After the headings get their ids (toc, 5), before mkdocs checks and rewrites links (relpath, 0).
        md.treeprocessors.register(RepoLinks(md), "repo_links", 1)


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    config.markdown_extensions.append(RepoLinksExtension())
    return config


def on_files(files: Files, /, **_: object) -> Files:
    SITE.learn(files)
    return files


def on_page_markdown(markdown: str, /, *, page: Page, **_: object) -> str:
    SITE.current_page = page.file.src_uri
    return markdown
