"""The README stays true: every command and setting is documented, and CI runs its test command."""

import re
from pathlib import Path

import click
import pytest

import transcripts

from bot.cli import cli
from bot.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_is_in_the_readme(command):
    assert f"iotreg {command}" in README


@pytest.mark.parametrize("variable", sorted(Settings.VARIABLES))
def test_every_setting_is_in_the_configuration_table(variable):
    assert re.search(rf"^\| `{variable}` \|", README, re.MULTILINE), f"{variable} missing from the table"


def test_every_documented_setting_exists():
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", README, re.MULTILINE))
    assert documented <= set(Settings.VARIABLES)


def test_the_quick_start_is_a_virtual_environment_the_demo_and_what_ci_runs():
    quick_start = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.DOTALL)[1].strip().splitlines()
    assert len(quick_start) == 3
    venv, demo, tests = quick_start
    assert venv.startswith("python3 -m venv .venv")
    assert demo.startswith("pip install") and demo.endswith("iotreg demo")
    assert tests.startswith("pip install") and tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("variable", sorted(Settings.VARIABLES))
def test_every_setting_is_in_the_env_example(variable):
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert re.search(rf"^#? ?{variable}=", example, re.MULTILINE), f"{variable} missing from .env.example"


def test_the_env_example_parses_and_sets_no_secret():
    from bot.config import read_env_file

    values = read_env_file(ROOT / ".env.example")
    assert values["ALIBABA_CLOUD_ACCESS_KEY_SECRET"] == "" and values["SLACK_BOT_TOKEN"] == ""
    Settings.from_env(values)  # every value in it is well-formed


@pytest.mark.parametrize("command", sorted(transcripts.TRANSCRIPTS))
def test_the_readmes_transcripts_are_what_the_commands_print(command):
    """Each transcript, run again against the emulator, prints the same (times, ports, folders and
    dates aside). `python tests/transcripts.py --write` brings the README up to date."""
    block = transcripts.readme_blocks(README)[command]
    assert transcripts.normalise(transcripts.TRANSCRIPTS[command]()) == transcripts.normalise(block)


def test_every_option_of_every_command_has_help():
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, f"iotreg {name} {param.opts[0]} has no help"


def test_the_benchmark_runner_has_its_own_help():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--quick" in result.stdout and "===" not in result.stdout
