"""docs/cli.md documents every flag of every command, and no flag a command does not have.

Each command's argparse parser (`build_parser()` in tome_deploy/cli/*.py, tome-deploy's subcommands included) is
built and its option strings collected (`-h/--help` aside). The command's section of docs/cli.md (the `## ` heading
that names it) must list each of them in its flag table (the first column of a `|` row) or as a list item that
starts with the flag; and every flag listed there must be one the parser has.
"""

import argparse
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"

# Section heading in docs/cli.md -> (module in tome_deploy.cli, subcommand or None).
COMMANDS = {
    "tome-export": ("export", None),
    "tome-validate": ("validate", None),
    "tome-tune": ("tune", None),
    "tome-build": ("build", None),
    "tome-visualize": ("visualize", None),
    "tome-serve": ("serve", None),
    "tome-deploy triton-repo": ("deploy", "triton-repo"),
}

FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
CELL_SEPARATOR = re.compile(r"(?<!\\)\|")
LIST_ITEM_FLAG = re.compile(r"^\s*[-*]\s+`(--?[A-Za-z][\w-]*)")


def parser_for(module: str, subcommand: str | None) -> argparse.ArgumentParser:
    parser = importlib.import_module(f"tome_deploy.cli.{module}").build_parser()
    if subcommand is None:
        return parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[subcommand]
    raise AssertionError(f"{module}.build_parser() has no subcommands")


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    }


def sections(text: str) -> dict[str, str]:
    """`## ` sections of a markdown page (headings inside code fences do not count), by heading text."""
    found: dict[str, list[str]] = {}
    current = None
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("## "):
            current = line[3:].replace("`", "").strip()
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return {title: "\n".join(lines) for title, lines in found.items()}


def documented_flags(section: str) -> set[str]:
    """Flags in the first column of the section's tables and at the start of its list items."""
    flags: set[str] = set()
    for line in section.splitlines():
        if line.lstrip().startswith("|"):
            cells = CELL_SEPARATOR.split(line.strip())
            if len(cells) > 2 and not set(cells[1].strip()) <= set("-: "):
                flags.update(FLAG.findall(cells[1]))
        else:
            match = LIST_ITEM_FLAG.match(line)
            if match:
                flags.add(match.group(1))
    return flags


@pytest.fixture(scope="module")
def cli_sections() -> dict[str, str]:
    return sections(CLI_DOC.read_text(encoding="utf-8"))


def test_every_console_script_and_subcommand_has_a_section(cli_sections):
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    scripts_block = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"tome_deploy\.cli\.(\w+):', scripts_block, flags=re.MULTILINE))
    assert scripts, "no tome_deploy.cli console scripts found in pyproject.toml"
    commands = set()
    for script, module in scripts.items():
        parser = importlib.import_module(f"tome_deploy.cli.{module}").build_parser()
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subparsers:
            commands.update(f"{script} {name}" for name in subparsers[0].choices)
        else:
            commands.add(script)
    assert commands == set(COMMANDS), "COMMANDS in this test must list every console script and subcommand"
    missing = sorted(set(COMMANDS) - set(cli_sections))
    assert not missing, f"docs/cli.md has no '## ' section for {missing}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_doc_lists_exactly_the_parsers_flags(command, cli_sections):
    module, subcommand = COMMANDS[command]
    have = option_strings(parser_for(module, subcommand))
    documented = documented_flags(cli_sections.get(command, ""))
    missing = sorted(have - documented)
    unknown = sorted(documented - have)
    assert not missing, f"docs/cli.md, section '{command}': flags the command has but the page does not list: {missing}"
    assert not unknown, (
        f"docs/cli.md, section '{command}': flags the page lists but the command does not have: {unknown}"
    )


def test_the_checks_see_a_missing_and_an_unknown_flag():
    section = "| flag | meaning |\n|---|---|\n| `--r R`, `-o PATH` | x |\n- `--bogus` y\nprose `--not-counted`\n"
    assert documented_flags(section) == {"--r", "-o", "--bogus"}
