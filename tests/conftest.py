"""Shared fixtures.

``emulator``: the whole IoT Platform emulator (backend, gateway, HTTP server on a free port) on a
:class:`~bot.clock.ManualClock` that starts at the real now, so that requests signed with the real
time (the official SDK's) are inside the 15-minute window. It exposes ``endpoint``,
``access_key_id``, ``access_key_secret``, ``product_key``, ``clock``, ``backend``, ``gateway`` and
``server``. Statuses move only when a test calls ``emulator.clock.advance(...)``: CHECK lasts
``check_seconds`` (2) and CREATE ``create_seconds`` (3). QPS quotas are on; a test that needs more
calls advances the clock a second or sets ``emulator.gateway.enforce_quotas = False``.

``make_emulator(**options)``: the same with other :class:`~bot.standins.emulator.Emulator` options.

``store_location``: a fresh database of every kind, SQLite and PostgreSQL (what ``IOTREG_DB`` is
set to): a test that takes it, or a fixture that does (the Slack scenarios, the CLI's ``run``), runs
once per kind. ``store``: the store open on it, for the contract suite. A test about SQLite's own
file asks for that kind alone with ``@pytest.mark.parametrize("store_location", ["sqlite"],
indirect=True)``. ``pg_cluster`` and ``postgres_url``: the session's PostgreSQL server (see
``tests/postgres.py``) and a new database on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bot.clock import ManualClock
from bot.standins.emulator import Emulator
from bot.standins.postgres import TempCluster
from bot.store import Store, open_store
from postgres import fresh_database, start_cluster

EMULATOR_DEFAULTS: dict[str, object] = {
    "access_key_id": "test-key-id",
    "access_key_secret": "test-key-secret",
    "product_keys": ("a1TestProd1",),
    "check_seconds": 2.0,
    "create_seconds": 3.0,
    "seed": 20260105,
}


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., Emulator]]:
    """Start emulators with the test defaults overridden by keyword; all stop at teardown."""
    started: list[Emulator] = []

    def make(**options: object) -> Emulator:
        settings = {**EMULATOR_DEFAULTS, "clock": ManualClock(datetime.now(timezone.utc)), **options}
        emulator = Emulator(**settings).start()  # type: ignore[arg-type]
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()


@pytest.fixture
def emulator(make_emulator: Callable[..., Emulator]) -> Emulator:
    """A running emulator with known credentials and one product (see the module docstring)."""
    return make_emulator()


# -- stores -----------------------------------------------------------------------------------
#
# ``store_location`` is a fresh database of each kind (a SQLite file, a PostgreSQL database), and
# ``store`` the store open on it: the contract suite runs every test once per kind. Another store
# is one more entry in STORES.


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[TempCluster]:
    """The session's PostgreSQL server (skipped where none is installed, failed under CI=true)."""
    cluster = start_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def postgres_url(pg_cluster: TempCluster) -> str:
    """A new, empty database for this test alone."""
    return fresh_database(pg_cluster)


STORES: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "sqlite": lambda request, tmp_path: str(tmp_path / "iotreg.db"),
    "postgres": lambda request, tmp_path: request.getfixturevalue("postgres_url"),
}


@pytest.fixture(params=sorted(STORES))
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh store of each kind lives: what ``IOTREG_DB`` would be set to."""
    return STORES[request.param](request, tmp_path)


@pytest.fixture
def store(store_location: str) -> Iterator[Store]:
    opened = open_store(store_location)
    yield opened
    opened.close()
