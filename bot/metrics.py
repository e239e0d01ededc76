"""Prometheus metrics of one running bot, served at ``GET /metrics`` in both modes.

Each :class:`Metrics` has its own registry (never prometheus-client's global one), so a process can
hold several bots, as the tests do. Two kinds of figure:

* Read from the database at scrape time (:class:`_DatabaseCollector`, over
  :meth:`~bot.store.Store.figures`): requests by state, approvals waiting, undelivered
  notifications, devices registered. Every replica on the same database reports the same values.
* Counted by this process as it works: IoT Platform calls (told by the client's ``observer``) and
  Slack Web API calls (counted by :class:`CountingWebClient`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.domain import State
from bot.store import Figures

log = logging.getLogger(__name__)

#: Every state, so that a state with no request reads 0 instead of vanishing from the series.
STATES = sorted(State)
#: IoT Platform answers in tens of milliseconds; retries and throttling stretch it to seconds.
IOT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The registry of one bot and the instruments the bot's parts report to."""

    def __init__(self, figures: Callable[[], Figures]) -> None:
        self.registry = CollectorRegistry()
        self.iot_calls = Counter(
            "iotreg_iot_calls", "IoT Platform API calls (each HTTP attempt), by action and outcome.",
            ["action", "outcome"], registry=self.registry,
        )
        self.iot_seconds = Histogram(
            "iotreg_iot_call_seconds", "Time of one IoT Platform API call, by action.",
            ["action"], buckets=IOT_BUCKETS, registry=self.registry,
        )
        self.slack_calls = Counter(
            "iotreg_slack_calls", "Slack Web API calls (after the client's own retries), by method and outcome.",
            ["method", "outcome"], registry=self.registry,
        )
        self.registry.register(_DatabaseCollector(figures))

    def iot_call(self, action: str, outcome: str, seconds: float) -> None:
        """The IoT client's observer: ``outcome`` is ``ok``, ``throttled`` or ``error``."""
        self.iot_calls.labels(action, outcome).inc()
        self.iot_seconds.labels(action).observe(seconds)

    def slack_call(self, method: str, outcome: str) -> None:
        self.slack_calls.labels(method, outcome).inc()

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _DatabaseCollector(Collector):
    """Gauges read from the database when scraped; a scrape that cannot read it reports none."""

    def __init__(self, figures: Callable[[], Figures]) -> None:
        self.figures = figures

    def describe(self) -> list[Metric]:
        return []  # values come from the database at collect time only

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self.figures()
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can; /healthz tells the rest
            log.warning("metrics: could not read the database: %s", type(exc).__name__)
            return
        requests = GaugeMetricFamily("iotreg_requests", "Registration requests in the database, by state.", labels=["state"])
        for state in STATES:
            requests.add_metric([state], figures.requests_by_state.get(state, 0))
        yield requests
        yield GaugeMetricFamily(
            "iotreg_pending_approvals", "Requests waiting for an approver.",
            value=figures.requests_by_state.get(State.AWAITING_APPROVAL, 0),
        )
        yield GaugeMetricFamily("iotreg_outbox_pending", "Notifications not yet delivered to Slack.", value=figures.outbox_pending)
        yield CounterMetricFamily(
            "iotreg_devices_registered", "Devices created on IoT Platform by iotreg (all requests).", value=figures.devices_created,
        )


def outcome_of_slack_error(error: SlackApiError) -> str:
    status = getattr(error.response, "status_code", None)
    return "throttled" if status == 429 or error.response.get("error") == "ratelimited" else "error"


class CountingWebClient(WebClient):
    """slack-sdk's client, each Web API call counted by method and outcome (``ok``, ``throttled``,
    ``error``) and each failure logged on one line with Slack's error code."""

    def __init__(self, *args: Any, on_call: Callable[[str, str], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_call = on_call

    def api_call(self, api_method: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            response = super().api_call(api_method, *args, **kwargs)
        except SlackApiError as exc:
            outcome = outcome_of_slack_error(exc)
            log.info("Slack call failed: %s: %s", api_method, exc.response.get("error") or f"HTTP {exc.response.status_code}",
                     extra={"method": api_method, "outcome": outcome})
            self.on_call(api_method, outcome)
            raise
        except Exception as exc:
            log.info("Slack call failed: %s: %s", api_method, type(exc).__name__, extra={"method": api_method, "outcome": "error"})
            self.on_call(api_method, "error")
            raise
        self.on_call(api_method, "ok")
        return response
