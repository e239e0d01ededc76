"""The README's transcripts, made by running the commands they show, and compared with the README.

    python tests/transcripts.py            # say which transcripts differ from a fresh run
    python tests/transcripts.py --write    # put fresh runs into README.md

Each transcript is a fenced ``console`` block whose first line is the command (``$ iotreg …``).
What changes from run to run (times, ports, temporary folders, dates, the user's name) is
normalised before comparing; tests/test_docs.py runs the comparison.
"""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

DEMO = "$ iotreg demo"
REGISTER = "$ iotreg register devices.csv --product-key a1EmuDemo01 --yes --output results.csv"


def demo() -> str:
    from bot.demo import run_demo

    lines: list[str] = [DEMO]
    with tempfile.TemporaryDirectory(prefix="iotreg-demo-") as folder:  # named as the demo's own
        run_demo(out=lines.append, folder=Path(folder))
    return "\n".join(lines)


def register() -> str:
    """25,000 names and three bad lines, against the emulator with 1% of creations failing."""
    from bot.cli import cli
    from bot.clock import SystemClock
    from bot.standins.emulator import Emulator

    emulator = Emulator(
        clock=SystemClock(), check_seconds=0, create_seconds=0, create_failure_rate=0.01, seed=7, enforce_quotas=False
    ).start()
    try:
        with tempfile.TemporaryDirectory() as folder:
            devices = Path(folder) / "devices.csv"
            names = [f"factory-{i:05d}" for i in range(25_000)]
            devices.write_text("DeviceName\n" + "\n".join(names) + "\nbad#name\nab\nfactory-00001\n", encoding="utf-8")
            env = {
                **emulator.env(), "IOTREG_DB": str(Path(folder) / "iotreg.db"), "IOTREG_POLL_INTERVAL": "0.05",
                # The 500 pages of created devices at the emulator's pace, not the platform's quota of 50 a second.
                "IOT_QPS": "QueryPageByApplyId=2000",
            }
            with contextlib.chdir(folder):
                result = CliRunner().invoke(cli, REGISTER.split()[2:], env=env)
    finally:
        emulator.stop()
    return REGISTER + "\n" + result.output.rstrip("\n")


TRANSCRIPTS: dict[str, Callable[[], str]] = {DEMO: demo, REGISTER: register}

_VOLATILE = [
    (re.compile(r"\[\s*\d+\.\ds\]"), "[ T ]"),
    (re.compile(r"in \d+\.\ds\."), "in T."),
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:PORT"),
    (re.compile(r"/tmp/[^/\s]+"), "/tmp/FOLDER"),
    (re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC"), "DATE UTC"),
    (re.compile(r"cli:[\w.-]+"), "cli:USER"),
]


def normalise(text: str) -> list[str]:
    """The lines of a transcript with what changes from run to run replaced, in a stable order
    (steps that two threads take at the same moment may be printed in either order)."""
    lines = []
    for line in text.strip("\n").splitlines():
        for pattern, replacement in _VOLATILE:
            line = pattern.sub(replacement, line)
        lines.append(line.rstrip())
    return sorted(lines)


def readme_blocks(readme: str) -> dict[str, str]:
    """Every ``console`` block of the README that starts with one of :data:`TRANSCRIPTS`' commands."""
    blocks = {}
    for match in re.finditer(r"```console\n(.*?)```", readme, re.DOTALL):
        first = match[1].splitlines()[0]
        if first in TRANSCRIPTS:
            blocks[first] = match[1].rstrip("\n")
    return blocks


def main(argv: list[str]) -> int:
    readme = README.read_text(encoding="utf-8")
    stale = 0
    for command, block in readme_blocks(readme).items():
        fresh = TRANSCRIPTS[command]()
        if "--write" in argv:
            readme = readme.replace(block, fresh)
        if normalise(fresh) == normalise(block):
            print(f"up to date: {command}")
            continue
        stale += 1
        print(f"differs from a fresh run: {command}")
    if "--write" in argv:
        README.write_text(readme, encoding="utf-8")
        print("README.md written")
        return 0
    return 1 if stale else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
