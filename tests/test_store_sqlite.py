"""What only the SQLite store promises: one serving process per file."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from bot.store import StoreBusy
from bot.store.sqlite import SqliteStore

HOLDER = """
import sys
from bot.store.sqlite import SqliteStore
store = SqliteStore(sys.argv[1])
store.hold("serve")
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_process_cannot_serve_from_the_same_sqlite_file_until_the_first_is_gone(tmp_path):
    path = tmp_path / "iotreg.db"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        store = SqliteStore(path)
        with pytest.raises(StoreBusy, match="use PostgreSQL"):
            store.hold("serve")
        store.hold("cli")  # another purpose is not refused
        holder.send_signal(signal.SIGKILL)  # however the first one ends, its claim ends with it
        holder.wait(timeout=10)
        store.hold("serve")
        store.close()
    finally:
        holder.kill()
        holder.wait(timeout=10)
