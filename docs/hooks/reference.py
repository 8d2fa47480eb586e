"""MkDocs hook: the reference page's tables, generated from the code at every build.

docs/reference.md holds the prose and two placeholders; this fills them from `settings.Settings` (every
setting: variable, type, default, bounds, description) and from the Typer apps (every command: usage, help,
arguments and options as `--help` prints them). Written from the code, the page cannot drift from it, and
tests/test_docs.py checks that it names every setting and every command.
"""

from __future__ import annotations

import html
import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.pages import Page
from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from typer.core import TyperGroup

if TYPE_CHECKING:  # Typer 0.29 carries its own copy of click: these are its classes.
    from typer._click.core import Command

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_PAGE = "reference.md"
SETTINGS_PLACEHOLDER = "<!-- reference:settings -->"
COMMANDS_PLACEHOLDER = "<!-- reference:commands -->"
# Every command line of the project: how it is run, and the module attribute that holds its Typer app.
# tests/test_docs.py checks that no Typer app of the project is missing here.
COMMAND_LINES = (
    ("python train.py", "train", "app"),
    ("python -m drift", "drift.cli", "app"),
    ("python -m lifecycle", "lifecycle.cli", "app"),
    ("python -m serving.auth", "serving.auth", "cli"),
)
# `--help` ends an option's help with its default and bounds: "...  [default: 5; 2<=x<=20]".
DEFAULT_SUFFIX = re.compile(r"\s*\[([^\[\]]*)\]$")
# pydantic keeps a field's bounds as annotated_types rules, each with one attribute: Ge(ge=0), Lt(lt=1), ...
BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    # mkdocs loads hooks by path: the project's own modules are importable only once its root is on the path.
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    return config


def on_page_markdown(markdown: str, /, *, page: Page, **_: object) -> str:
    if page.file.src_uri != REFERENCE_PAGE:
        return markdown
    for placeholder in (SETTINGS_PLACEHOLDER, COMMANDS_PLACEHOLDER):
        if placeholder not in markdown:
            raise ValueError(f"docs/{REFERENCE_PAGE} lost its placeholder {placeholder}")
    markdown = markdown.replace(SETTINGS_PLACEHOLDER, settings_table())
    return markdown.replace(COMMANDS_PLACEHOLDER, "\n\n".join(command_sections()))


def text(value: str) -> str:
    """Plain text safe in Markdown (and in a table cell): nothing in it is read as markup."""
    value = html.escape(" ".join(value.split()), quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", value)


def code(value: str) -> str:
    """Code in a table cell: `|` as a character reference, or the table would take it for a cell's end."""
    return "<code>" + html.escape(value).replace("|", "&#124;") + "</code>"


# ---- settings ----------------------------------------------------------------------------------------------


def settings_table() -> str:
    settings_class = importlib.import_module("settings").Settings
    # Three columns, type, default and bounds stacked in one: five leave the names too little room.
    rows = ["| variable | type, default, bounds | description |", "| --- | --- | --- |"]
    for name, field in settings_class.model_fields.items():
        bounds = bounds_text(field)
        cells = (
            "<br>".join(code(variable) for variable in environment_variables(name, field)),
            "<br>".join(
                (code(type_name(field.annotation)), f"default {default_text(field.default)}")
                + ((text(bounds),) if bounds else ())
            ),
            text(field.description or ""),
        )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def environment_variables(name: str, field: FieldInfo) -> list[str]:
    """The variables a setting is read from: TABSERVE_<NAME>, or the tool's own names it accepts instead."""
    if isinstance(field.validation_alias, AliasChoices):
        return [str(choice) for choice in field.validation_alias.choices]
    return [f"TABSERVE_{name.upper()}"]


def type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(pathlib|typing)\.", "", str(annotation))


def default_text(default: Any) -> str:
    """The default as a reader of this page would write it, not as it reads on the machine that built it."""
    if default is None:
        return "none"
    if isinstance(default, Path):
        if default.is_relative_to(PROJECT_ROOT):
            return code(f"<project>/{default.relative_to(PROJECT_ROOT)}")
        if default.is_relative_to(Path.home()):
            return code(f"~/{default.relative_to(Path.home())}")
    if isinstance(default, bool):
        return code(str(default).lower())
    if isinstance(default, int) and default >= 2**20 and default % 2**20 == 0:
        return f"{code(str(default))} ({default // 2**20:,} MiB)"
    return code(str(default))


def bounds_text(field: FieldInfo) -> str:
    return ", ".join(
        f"{symbol} {getattr(rule, attribute)}"
        for rule in field.metadata
        for attribute, symbol in BOUNDS
        if getattr(rule, attribute, None) is not None
    )


# ---- command lines -----------------------------------------------------------------------------------------


def command_sections() -> Iterator[str]:
    for program, module_name, attribute in COMMAND_LINES:
        app = getattr(importlib.import_module(module_name), attribute)
        command = typer.main.get_command(app)
        context = typer.Context(command, info_name=program)
        yield command_section(command, context, level=3)
        if isinstance(command, TyperGroup):
            for name in command.list_commands(context):
                subcommand = command.get_command(context, name)
                if subcommand is not None and not subcommand.hidden:
                    subcontext = typer.Context(subcommand, info_name=name, parent=context)
                    yield command_section(subcommand, subcontext, level=4)


def command_section(command: Command, context: typer.Context, level: int) -> str:
    parts = [
        f"{'#' * level} `{context.command_path}`",
        f"```text\n{command.get_usage(context)}\n```",
        *help_paragraphs(command.help or ""),
    ]
    # A hidden parameter has no help record; a group's options (only --help) are not worth a table.
    records = [
        record for parameter in command.get_params(context) if (record := parameter.get_help_record(context))
    ]
    if records and not isinstance(command, TyperGroup):
        parts.append(parameters_table(records))
    return "\n\n".join(parts)


def help_paragraphs(help_text: str) -> Iterator[str]:
    """Click's help: paragraphs, where one that starts with \\b is kept as written (here, as code)."""
    for paragraph in re.split(r"\n\s*\n", help_text.strip()):
        if paragraph.startswith("\b"):
            lines = paragraph.removeprefix("\b").strip("\n").splitlines()
            indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
            yield "```text\n" + "\n".join(line[indent:] for line in lines) + "\n```"
        elif paragraph:
            yield text(paragraph)


def parameters_table(records: list[tuple[str, str]]) -> str:
    """One row per `--help` line: how to write the argument or option, its default and bounds, its help."""
    rows = ["| argument or option | default and bounds | help |", "| --- | --- | --- |"]
    for spelling, help_line in records:
        suffix = DEFAULT_SUFFIX.search(help_line)
        details, help_alone = (suffix.group(1), help_line[: suffix.start()]) if suffix else ("", help_line)
        rows.append(f"| {code(spelling)} | {text(details)} | {text(help_alone)} |")
    return "\n".join(rows)
