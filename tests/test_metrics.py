"""Metrics as Prometheus scrapes them, parsed with prometheus-client's own parser: database figures
that every replica reports alike, and IoT Platform and Slack calls counted by outcome."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families
from slack_sdk.errors import SlackApiError

import sqlite3

from bot.domain import Kind, Origin, State
from bot.store import Figures
from bot.store.sqlite import SqliteStore
from bot import wiring
from bot.aliyun import errors
from bot.config import Settings
from bot.metrics import CountingWebClient, Metrics
from bot.standins.emulator.gateway import FaultPlan
from bot.standins.slack import FakeSlack

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_every_replica_on_one_database_reports_the_same_gauges(tmp_path):
    path = tmp_path / "iotreg.db"
    one, other = SqliteStore(path), SqliteStore(path)
    for state, count in [(State.AWAITING_APPROVAL, 3), (State.AWAITING_APPROVAL, 2), (State.CHECKING, 1), (State.DONE, 4)]:
        one.create_request(product_key="a1P", requester="U0ALICE", origin=Origin.SLACK, kind=Kind.NAMES, count=count, state=state, now=NOW,
                           devices=[(f"d-{state}-{i}", None, i) for i in range(count)], chunks=[count], event=("checking", {}))
    seen = [samples(Metrics(store.figures)) for store in (one, other)]
    assert seen[0] == seen[1]
    assert seen[0][("iotreg_requests", (("state", "awaiting_approval"),))] == 2
    assert seen[0][("iotreg_requests", (("state", "expired"),))] == 0  # every state, even with none
    assert seen[0][("iotreg_pending_approvals", ())] == 2
    assert seen[0][("iotreg_outbox_pending", ())] == 4
    assert seen[0][("iotreg_devices_registered_total", ())] == 0


def test_a_scrape_without_a_database_leaves_out_its_figures_and_still_answers(tmp_path):
    def broken() -> Figures:
        raise sqlite3.OperationalError("disk I/O error")

    metrics = Metrics(broken)
    metrics.slack_call("chat.postMessage", "ok")
    names = {name for name, _ in samples(metrics)}
    assert "iotreg_slack_calls_total" in names and "iotreg_requests" not in names


def test_iot_platform_calls_are_counted_and_timed_by_action_and_outcome_and_each_failure_logged(make_emulator, caplog):
    caplog.set_level(logging.INFO, logger="bot")
    metrics = Metrics(lambda: Figures({}, 0, 0))
    healthy = make_emulator()
    client = wiring.iot_client(Settings.from_env(healthy.env()), clock=healthy.clock, observer=metrics.iot_call)
    client.batch_check_device_names(healthy.product_key, ["metric-0001"])
    with pytest.raises(errors.IotError):
        client.query_batch_register_device_status(healthy.product_key, 999_999)
    throttling = make_emulator(faults=FaultPlan(throttle_rate=1.0, seed=1), access_key_id="throttled-key")
    throttled = wiring.iot_client(Settings.from_env({**throttling.env(), "IOT_MAX_ATTEMPTS": "3"}), clock=throttling.clock,
                                  observer=metrics.iot_call)
    with pytest.raises(errors.ThrottledError):
        throttled.batch_check_device_names(throttling.product_key, ["metric-0002"])
    seen = samples(metrics)
    assert seen[("iotreg_iot_calls_total", (("action", "BatchCheckDeviceNames"), ("outcome", "ok")))] == 1
    assert seen[("iotreg_iot_calls_total", (("action", "QueryBatchRegisterDeviceStatus"), ("outcome", "error")))] == 1
    assert seen[("iotreg_iot_calls_total", (("action", "BatchCheckDeviceNames"), ("outcome", "throttled")))] == 3
    assert seen[("iotreg_iot_call_seconds_count", (("action", "BatchCheckDeviceNames"),))] == 4
    failed = [r for r in caplog.records if r.getMessage().startswith("IoT Platform call failed")]
    assert [r.action for r in failed] == ["QueryBatchRegisterDeviceStatus"] + ["BatchCheckDeviceNames"] * 3


def test_slack_calls_are_counted_by_method_and_outcome_and_each_failure_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="bot")
    metrics = Metrics(lambda: Figures({}, 0, 0))
    with FakeSlack() as fake:
        fake.add_channel("C0OPS", "iot-ops")
        client = CountingWebClient(token=fake.bot_token, base_url=fake.api_url, on_call=metrics.slack_call)
        client.chat_postMessage(channel="C0OPS", text="hello")
        fake.fail("chat.postMessage", status=429, retry_after=1)
        with pytest.raises(SlackApiError):
            client.chat_postMessage(channel="C0OPS", text="again")
        with pytest.raises(SlackApiError):
            client.chat_postMessage(channel="C0NOPE", text="nowhere")
    seen = samples(metrics)
    for outcome in ("ok", "throttled", "error"):
        assert seen[("iotreg_slack_calls_total", (("method", "chat.postMessage"), ("outcome", outcome)))] == 1
    failed = [r.getMessage() for r in caplog.records if r.name == "bot.metrics"]
    assert failed == ["Slack call failed: chat.postMessage: ratelimited", "Slack call failed: chat.postMessage: channel_not_found"]
