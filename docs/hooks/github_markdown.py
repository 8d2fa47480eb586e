"""MkDocs hook: lists written for GitHub read as GitHub reads them.

README.md, BENCHMARKS.md, RELIABILITY.md and the pages in docs/ are written for GitHub (CommonMark), and two
of its list rules differ from Python-Markdown's, which MkDocs uses:

- a list may start right after a paragraph line; Python-Markdown needs a blank line before it, or the items
  are read as more of the paragraph;
- what belongs to an item is indented to the item's text (2 spaces after `- `, 3 after `1. `); Python-Markdown
  needs 4, or a code block or a nested list in an item ends the list.

So before Markdown reads a page (after the snippets are included), a blank line goes before a list that
follows a paragraph, and what an item holds is indented to 4 spaces. Lines in fenced code are left alone.
"""

from __future__ import annotations

import re

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor
from mkdocs.config.defaults import MkDocsConfig

ITEM = re.compile(r"^(?P<marker>[-*+]|\d{1,9}[.)]) +(?=\S)")
FENCE = re.compile(r"^ *(```|~~~)")
PYTHON_MARKDOWN_INDENT = 4


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def github_lists(lines: list[str]) -> list[str]:
    out: list[str] = []
    item_text_column: int | None = None  # in a top-level list item: where its text starts; else None
    item_has_blank = False  # the item has a blank line: Python-Markdown reads its next lines as a new block
    in_fence = False
    for line in lines:
        if in_fence and item_text_column is None:  # fenced code outside a list stays as it is
            in_fence = not FENCE.match(line)
            out.append(line)
            continue
        text = line
        item = ITEM.match(line)
        if item is not None:
            previous = out[-1] if out else ""
            follows_block = (
                item_text_column is None and not previous.startswith(("|", "<"))
            ) or item_has_blank
            if previous.strip() and (follows_block or FENCE.match(previous)):
                out.append("")  # a list right after a paragraph, an item right after a block of an item
            item_text_column, item_has_blank = item.end(), False
        elif item_text_column is not None and not line.strip():
            item_has_blank = item_has_blank or not in_fence
        elif item_text_column is not None and indent_of(line) >= item_text_column:
            text = " " * (PYTHON_MARKDOWN_INDENT - item_text_column) + line
        elif item_text_column is not None and out[-1] == "" and not in_fence:
            item_text_column = None  # a paragraph after a blank line, not indented: the list has ended
        if FENCE.match(text):
            in_fence = not in_fence
        out.append(text)
    return out


class GithubLists(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return github_lists(lines)


class GithubListsExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802 (Python-Markdown's name)
        # After pymdownx.snippets has included the files (32), before anything reads blocks or fences.
        md.preprocessors.register(GithubLists(md), "github_lists", 31.5)


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    config.markdown_extensions.append(GithubListsExtension())
    return config
