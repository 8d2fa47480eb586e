"""The documentation site: built strictly as `make docs-build` builds it, checked against the code.

The reference page is generated from the code (docs/hooks/reference.py); these tests compare it with the
code again, found independently (every field of `Settings`, every Typer app in the project), so that a new
setting, command or option the page misses fails here. The built site must work offline and leave no page of
docs/ out of its navigation.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import AliasChoices

from settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCS = PROJECT_ROOT / "docs"
# Folders that hold no code of the project: tests, outputs (environments and caches start with a dot).
NOT_PROJECT = {"tests", "data", "site", "results"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    return site_dir


class _Page(HTMLParser):
    """A built page: its text (whitespace collapsed) and the addresses of what a browser would load for it."""

    def __init__(self) -> None:
        super().__init__()
        self.words: list[str] = []
        self.loads: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self._in_style = self._in_style or tag == "style"
        if tag in {"script", "img", "iframe", "source", "audio", "video", "embed"} and values.get("src"):
            self.loads.append(values["src"] or "")
        if tag == "link" and values.get("href"):  # stylesheets, fonts, preloads, preconnects, icons
            self.loads.append(values["href"] or "")
        if values.get("style"):
            self.loads.extend(_css_urls(values["style"] or ""))

    def handle_endtag(self, tag: str) -> None:
        self._in_style = self._in_style and tag != "style"

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.loads.extend(_css_urls(data))
        self.words.extend(data.split())

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _css_urls(css: str) -> Iterator[str]:
    for piece in css.split("url(")[1:]:
        yield piece.split(")", 1)[0].strip("'\" ")
    for piece in css.split("@import")[1:]:
        yield piece.strip().strip("'\"")


def _read(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _reference_text(site: Path) -> str:
    return _read(site / "reference" / "index.html").text


def _external(address: str) -> bool:
    return address.startswith(("http:", "https:", "//"))


def test_every_setting_is_in_the_reference(site: Path) -> None:
    text = _reference_text(site)
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description for the reference"
        if isinstance(field.validation_alias, AliasChoices):
            variables = [str(choice) for choice in field.validation_alias.choices]
        else:
            variables = [f"TABSERVE_{name.upper()}"]
        for variable in variables:
            assert variable in text, f"{variable} is not in the reference"
        assert " ".join(field.description.split()) in text, (
            f"the description of {name} is not in the reference"
        )


def _typer_apps() -> Iterator[tuple[str, str]]:
    """(module, attribute) of every module-level `x = typer.Typer(...)` in the project's code."""
    for folder, subfolders, files in os.walk(PROJECT_ROOT):
        subfolders[:] = sorted(name for name in subfolders if name not in NOT_PROJECT and name[0] not in "._")
        for path in (Path(folder) / name for name in sorted(files) if name.endswith(".py")):
            yield from _typer_apps_in(path)


def _typer_apps_in(path: Path) -> Iterator[tuple[str, str]]:
    relative = path.relative_to(PROJECT_ROOT)
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "typer.Typer"
        ):
            module = ".".join(relative.with_suffix("").parts)
            for target in node.targets:
                yield module, ast.unparse(target)


def _hook_command_lines() -> tuple[tuple[str, str, str], ...]:
    spec = importlib.util.spec_from_file_location("reference_hook", DOCS / "hooks" / "reference.py")
    assert spec is not None
    assert spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    command_lines: tuple[tuple[str, str, str], ...] = hook.COMMAND_LINES
    return command_lines


def _commands(program: str, app: typer.Typer) -> Iterator[tuple[str, Any]]:
    """(command path, command) of an app's command and each of its visible subcommands."""
    command = typer.main.get_command(app)
    yield program, command
    context = typer.Context(command, info_name=program)
    for name in getattr(command, "list_commands", lambda _: [])(context):
        subcommand = command.get_command(context, name)  # type: ignore[attr-defined]
        if not subcommand.hidden:
            yield f"{program} {name}", subcommand


def test_every_command_and_option_is_in_the_reference(site: Path) -> None:
    command_lines = _hook_command_lines()
    documented = {(module, attribute) for _, module, attribute in command_lines}
    assert set(_typer_apps()) == documented, "a Typer app of the project is missing from the reference"
    text = _reference_text(site)
    for program, module, attribute in command_lines:
        app = getattr(importlib.import_module(module), attribute)
        for path, command in _commands(program, app):
            assert f"Usage: {path}" in text, f"{path} is not in the reference"
            if command.help:
                first_line = command.help.strip().splitlines()[0]
                assert first_line in text, f"the help of {path} is not in the reference"
            for parameter in command.params:
                if getattr(parameter, "hidden", False):
                    continue
                for spelling in (*parameter.opts, *parameter.secondary_opts):
                    assert spelling in text, f"{path}: {spelling} is not in the reference"
                help_text = " ".join((getattr(parameter, "help", None) or "").split())
                assert help_text in text, f"{path}: the help of {parameter.name} is not in the reference"


def test_the_site_loads_nothing_from_elsewhere(site: Path) -> None:
    """Offline: no script, style, font or image from another host, in any page or stylesheet."""
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        external = [address for address in _read(page).loads if _external(address)]
        assert not external, f"{page.relative_to(site)} loads {external}"
    for stylesheet in sorted(site.rglob("*.css")):
        external = [
            address for address in _css_urls(stylesheet.read_text(encoding="utf-8")) if _external(address)
        ]
        assert not external, f"{stylesheet.relative_to(site)} loads {external}"


def _nav_pages(nav: list[Any]) -> Iterator[str]:
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            yield from _nav_pages(value)
        else:
            yield value


def test_every_page_is_in_the_nav(site: Path) -> None:
    config = yaml.safe_load((PROJECT_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = set(_nav_pages(config["nav"]))
    left_out = set((config.get("not_in_nav") or "").split())  # pages left out on purpose, if any
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md") if "hooks" not in path.parts}
    assert pages - left_out == in_nav
    for page in in_nav:
        built = site / ("index.html" if page == "index.md" else f"{page.removesuffix('.md')}/index.html")
        assert built.is_file(), f"{page} was not built"
