"""Socket Mode stays connected: every way Slack ends or loses a connection, against a local Socket
Mode server that speaks Slack's protocol (hello, envelopes, acks, disconnect, close, drop, reset,
silence). Timings here are shortened; the production values are checked by arithmetic below."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from support import wait_until

from bot.config import Settings
from bot.jobs import InlineJobs
from bot.slack import socket_mode
from bot.slack.app import create_app
from bot.standins.slack import FakeSlack
from bot.standins.slack.socketmode import DISCONNECT_REASONS, SocketModeServer, socket_workspace

FAST = socket_mode.Timing(ping_interval=0.3, dead_after=1.0, tick=0.1, connect_timeout=1.0, max_backoff=0.5)
SLACK_ACK_LIMIT = 3.0  # Slack waits this long for an ack


class Connected:
    def __init__(self, fake: FakeSlack, bot, client: socket_mode.SocketModeClient) -> None:
        self.fake, self.bot, self.client = fake, bot, client
        self.server: SocketModeServer = fake.socket_mode

    def help_command(self, peer=None) -> tuple[str, float]:
        """Send `/devices help` as an envelope (on ``peer``, else the newest connection)."""
        return self.server.envelope("slash_commands", {
            "command": "/devices", "text": "help", "user_id": "U0ALICE", "user_name": "alice", "channel_id": "C0OPS",
            "channel_name": "iot-ops", "team_id": self.fake.team_id, "api_app_id": self.fake.app_id,
            "response_url": self.fake.response_url(channel="C0OPS", user="U0ALICE", kind="commands"),
            "trigger_id": self.fake.issue_trigger("U0ALICE"),
        }, peer=peer)

    def acked_within(self, envelope_id: str, sent: float) -> float:
        ack = self.server.wait_ack(envelope_id, timeout=10)
        assert ack is not None, "the envelope was never acked"
        assert "/devices register" in str(ack["payload"])  # the help text, answered in the ack
        return ack["at"] - sent

    def new_connection(self, number: int, timeout: float) -> float:
        """Seconds until connection ``number`` is open and is the client's current one."""
        started = time.monotonic()
        assert self.server.wait_for_connection(number, timeout) is not None, f"connection {number} never opened"
        assert wait_until(lambda: self.client.connection_number == number, timeout)
        return time.monotonic() - started


@pytest.fixture
def connected(emulator, tmp_path) -> Iterator[Connected]:
    fake = FakeSlack().start()
    fake.add_channel("C0OPS", "iot-ops")
    env = {**emulator.env(), "SLACK_BOT_TOKEN": fake.bot_token, "SLACK_APP_TOKEN": fake.app_token,
           "SLACK_API_URL": fake.api_url, "IOTREG_DB": str(tmp_path / "iotreg.db"), "IOTREG_WORKERS": "4"}
    bot = create_app(Settings.from_env(env), clock=emulator.clock, jobs=lambda steps: InlineJobs(emulator.clock, steps))
    bot.start()
    client = socket_mode.connection(bot.app, fake.app_token, fake.api_url, timing=FAST, concurrency=4)
    client.start()
    try:
        assert fake.socket_mode.wait_for_connection(1) is not None
        yield Connected(fake, bot, client)
    finally:
        client.close()
        bot.stop()
        fake.stop()


def cpu_share(during: float) -> float:
    """The share of one core this process used over the next ``during`` seconds of real time."""
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(during)  # the thing measured is the idle cost of the client's threads
    return (time.process_time() - cpu) / (time.monotonic() - wall)


def test_the_production_timing_notices_and_replaces_a_silent_connection_within_15_seconds():
    timing = socket_mode.Timing()
    assert timing.worst_case_replacement <= 13.5 < 15
    assert timing.dead_after >= 2 * timing.ping_interval + 1  # two pings unanswered, a second to spare
    assert timing.connect_timeout * 2 + timing.tick < SLACK_ACK_LIMIT + 3


def test_a_command_over_socket_mode_is_acked_with_its_answer(connected):
    envelope_id, sent = connected.help_command()
    assert connected.acked_within(envelope_id, sent) < 1.0
    assert connected.client.is_connected()


@pytest.mark.parametrize("reason", DISCONNECT_REASONS)
def test_after_a_disconnect_the_next_envelope_is_acked_within_3_seconds(connected, reason):
    asked = time.monotonic()
    old = connected.server.disconnect(reason)
    connected.new_connection(2, timeout=SLACK_ACK_LIMIT)
    envelope_id, _sent = connected.help_command()  # Slack sends the next one on the new connection
    assert connected.acked_within(envelope_id, asked) < SLACK_ACK_LIMIT - 1  # well inside Slack's 3 s
    assert connected.server.wait_for(lambda: old.closed, timeout=5), "the replaced connection was left open"


def test_an_envelope_still_sent_on_the_old_connection_after_a_disconnect_is_acked(connected):
    old = connected.server.disconnect("refresh_requested")
    envelope_id, sent = connected.help_command(peer=old)
    assert connected.acked_within(envelope_id, sent) < SLACK_ACK_LIMIT - 1


@pytest.mark.parametrize("how", ["close frame", "dropped without a close frame", "reset"])
def test_a_connection_that_ends_is_replaced_at_once_without_spinning(connected, how):
    ending = {"close frame": connected.server.close, "dropped without a close frame": connected.server.drop,
              "reset": connected.server.reset}[how]
    ending()
    assert connected.new_connection(2, timeout=5) < 2.0
    assert cpu_share(1.0) < 0.3  # the old reader ended instead of looping on a dead socket
    envelope_id, sent = connected.help_command()
    assert connected.acked_within(envelope_id, sent) < 1.0


def test_a_half_open_connection_is_noticed_and_replaced_within_the_bound_at_no_cpu_cost(connected):
    connected.server.silence()  # no close, no FIN: it stops reading, answering pings and sending
    started = time.monotonic()
    assert cpu_share(FAST.dead_after * 0.8) < 0.3  # waiting on it costs nothing
    waited = connected.new_connection(2, timeout=FAST.worst_case_replacement + 5) + (time.monotonic() - started)
    assert waited <= FAST.worst_case_replacement + 1.0
    envelope_id, sent = connected.help_command()
    assert connected.acked_within(envelope_id, sent) < 1.0


def test_a_live_connection_is_kept_it_answers_pings(connected):
    peer = connected.server.newest
    assert connected.server.wait_for(lambda: peer.pings >= 3, timeout=FAST.ping_interval * 10)
    assert connected.client.connection_number == 1 and len(connected.server.peers) == 1


def test_slack_unreachable_for_a_while_the_client_keeps_trying_and_comes_back(connected):
    connected.fake.fail("apps.connections.open", status=500, times=3)
    connected.server.drop()
    assert connected.new_connection(2, timeout=10) < 8
    assert connected.client.down_for() == 0


def test_a_command_typed_by_a_person_reaches_the_bot_over_socket_mode(connected):
    ws = socket_workspace(connected.fake)
    answer = ws.command("U0ALICE", "C0OPS", "help")
    assert answer.status_code == 200 and "/devices register" in answer.text


def test_slack_hands_out_socket_mode_urls_for_the_app_token_only():
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    with FakeSlack() as fake:
        assert WebClient(token=fake.app_token, base_url=fake.api_url).apps_connections_open(app_token=fake.app_token)["url"].startswith("ws://")
        for token, error in ((fake.bot_token, "not_allowed_token_type"), ("xapp-1-unknown", "invalid_auth")):
            with pytest.raises(SlackApiError) as refused:
                WebClient(token=token, base_url=fake.api_url).api_call("apps.connections.open")
            assert refused.value.response.status_code == 200 and refused.value.response["error"] == error


def test_health_says_whether_slack_is_connected_and_fails_after_a_minute_without(connected):
    connected.bot.socket = connected.client
    assert connected.bot.health() == (True, {"ok": True, "database": "ok", "scheduler": "running", "pending_notifications": 0,
                                             "slack": "connected"})

    class LongGone:
        def down_for(self) -> float:
            return 61.0

    connected.bot.socket = LongGone()
    ok, body = connected.bot.health()
    assert not ok and body["slack"] == "reconnecting for 61 s"
