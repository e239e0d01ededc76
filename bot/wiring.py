"""Where iotreg's parts are built from the settings and wired together, with constructors only.

The subpackages for outside systems (:mod:`bot.aliyun`, :mod:`bot.standins`) take plain values;
this module is where :class:`~bot.config.Settings` becomes those values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import requests

from bot.aliyun.client import MAX_COUNT_PER_REGISTER, Credentials, IotClient, RetryPolicy
from bot.aliyun.ratelimit import shared_limiter
from bot.clock import Clock, SystemClock
from bot.config import Settings
from bot.domain import Origin, Timing
from bot.policy import Policy
from bot.registration import Jobs, Notifier, Steps, Workflow
from bot.service import RequestService
from bot.store import Store, is_url, open_store


def iot_client(settings: Settings, *, session: requests.Session | None = None, clock: Clock | None = None) -> IotClient:
    """A client for the configured account, sharing the process-wide rate limiter."""
    settings.require("access_key_id", "access_key_secret")
    assert settings.access_key_id and settings.access_key_secret
    clock = clock or SystemClock()
    return IotClient(
        settings.endpoint,
        Credentials(settings.access_key_id, settings.access_key_secret),
        region_id=settings.region_id,
        instance_id=settings.instance_id,
        session=session,
        timeout=settings.timeout,
        retry=RetryPolicy(max_attempts=settings.max_attempts, deadline=settings.retry_deadline),
        limiter=shared_limiter(settings.access_key_id, settings.endpoint, settings.qps, clock),
        clock=clock,
    )


def timing(settings: Settings) -> Timing:
    """How the workflow paces itself, from the settings."""
    return Timing(
        poll_interval=settings.poll_interval,
        poll_max_interval=max(settings.poll_interval, settings.poll_max_interval),
        phase_timeout=settings.poll_timeout,
        approval_ttl=settings.approval_ttl,
        chunk_size=min(settings.chunk_size, MAX_COUNT_PER_REGISTER),
        claim_lease=settings.retry_deadline + settings.timeout * 2 + 30,
    )


def workflow(
    settings: Settings,
    *,
    clock: Clock,
    notifier: Callable[[RequestService], Notifier],
    jobs: Callable[[Steps], Jobs],
    client: IotClient | None = None,
    store: Store | None = None,
    policy: Policy | None = None,
    origins: frozenset[Origin] | None = None,
    api: bool = True,
) -> Workflow:
    """The workflow over the configured database and IoT Platform account.

    ``api=False``: without an IoT client, for what needs no API call (queries, a cancel); such a
    workflow must not be resumed. The client is built first, so that a missing AccessKey stops a
    command before it creates a database.
    """
    if client is None and api:
        client = iot_client(settings, clock=clock)
    return Workflow(
        store or open_store(settings.db_path),
        client,
        clock,
        timing(settings),
        notifier=notifier,
        jobs=jobs,
        policy=policy or Policy(allow_self_approval=settings.allow_self_approval),
        origins=origins,
    )


def database_exists(settings: Settings) -> bool:
    """Whether there is a database to read: a SQLite file that is not there yet has no requests,
    and a query should not create it (a server database always counts as there)."""
    return is_url(settings.db_path) or Path(settings.db_path).exists()


def prepare_home(settings: Settings) -> None:
    """Create iotreg's home folder when the database is to be made in it."""
    if settings.home and not is_url(settings.db_path) and Path(settings.db_path).parent == Path(settings.home):
        Path(settings.home).mkdir(parents=True, exist_ok=True)
