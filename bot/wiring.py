"""Where iotreg's parts are built from the settings and wired together, with constructors only.

The subpackages for outside systems (:mod:`bot.aliyun`, :mod:`bot.standins`) take plain values;
this module is where :class:`~bot.config.Settings` becomes those values.
"""

from __future__ import annotations

from collections.abc import Callable

import requests

from bot.aliyun.client import Credentials, IotClient, RetryPolicy
from bot.aliyun.ratelimit import shared_limiter
from bot.clock import Clock, SystemClock
from bot.config import Settings


def iot_client(
    settings: Settings,
    *,
    session: requests.Session | None = None,
    clock: Clock | None = None,
    observer: Callable[[str, str, float], None] | None = None,
) -> IotClient:
    """A client for the configured account, sharing the process-wide rate limiter; ``observer``
    is told of every call (the metrics)."""
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
        observer=observer,
    )
