"""Shared fixtures.

``emulator``: the whole IoT Platform emulator (backend, gateway, HTTP server on a free port) on a
:class:`~bot.clock.ManualClock` that starts at the real now, so that requests signed with the real
time (the official SDK's) are inside the 15-minute window. It exposes ``endpoint``,
``access_key_id``, ``access_key_secret``, ``product_key``, ``clock``, ``backend``, ``gateway`` and
``server``. Statuses move only when a test calls ``emulator.clock.advance(...)``: CHECK lasts
``check_seconds`` (2) and CREATE ``create_seconds`` (3). QPS quotas are on; a test that needs more
calls advances the clock a second or sets ``emulator.gateway.enforce_quotas = False``.

``make_emulator(**options)``: the same with other :class:`~bot.standins.emulator.Emulator` options.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import pytest

from bot.clock import ManualClock
from bot.standins.emulator import Emulator

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
