"""The README stays true: every command and setting is documented, and CI runs its test command."""

import re
from pathlib import Path

import pytest

from bot.cli import cli
from bot.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_is_in_the_readme(command):
    assert f"iotreg {command}" in README


@pytest.mark.parametrize("variable", sorted(Settings.ENV_NAMES.values()))
def test_every_setting_is_in_the_configuration_table(variable):
    assert re.search(rf"^\| `{variable}` \|", README, re.MULTILINE), f"{variable} missing from the table"


def test_every_documented_setting_exists():
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", README, re.MULTILINE))
    assert documented <= set(Settings.ENV_NAMES.values())


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```bash\n(pip install [^\n]+)\n```", README)[1]
    assert command.rstrip() in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
