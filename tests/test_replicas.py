"""Three `iotreg serve` replicas on one PostgreSQL database, as a deployment scales out: people's
commands and clicks land on any replica, replicas die (SIGKILL) or are stopped (SIGTERM) in the
middle of a request, and still every request ends once, every device is accounted for, every
ApplyId is registered once and every message is posted once.

The replicas are real processes (:mod:`bot.standins.replicas`) against the session's PostgreSQL,
the emulator on the real clock (quotas on) and the local Slack. One deployment serves the whole
module; each test starts the replicas that an earlier one left stopped.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from postgres import fresh_database

from bot.clock import SystemClock
from bot.domain import Outcome, State
from bot.leases import LEASE_SECONDS
from bot.slack.app import STOP_GRACE
from bot.slack import blocks
from bot.standins.emulator import Emulator
from bot.standins.replicas import ReplicaError, Replicas, Spread
from bot.standins.slack import FakeSlack
from bot.standins.slack.socketmode import socket_workspace
from bot.store import Store, open_store

SECRET = "replicas-signing-secret"
OPS = "C0OPS"
ALICE, BOB, CAROL, DAVE = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE"
PLAIN, PROD = "a1TestProd1", "a1ProdKey01"
#: A replica that dies holds its leases at most this long; the work then waits for a sweep (1 s).
LEASE = LEASE_SECONDS
POLICY = f"""
[default]
approvers = ["{BOB}", "{CAROL}", "{DAVE}"]
approvals = 1

[products.{PROD}]
approvals = 2
"""


def own_environ() -> dict[str, str]:
    """This process's environment without iotreg's, Slack's or Alibaba Cloud's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("IOTREG_", "SLACK_", "ALIBABA_CLOUD_", "IOT_"))}


class Deployment:
    """Three replicas, their database (``store``, opened here to look), the emulator, the local
    Slack, and people spread over the replicas (``spread``)."""

    def __init__(self, replicas: Replicas, store: Store, emulator: Emulator, fake: FakeSlack) -> None:
        self.replicas, self.store, self.emulator, self.fake = replicas, store, emulator, fake
        self.spread = Spread(replicas, fake, SECRET)

    def register(self, product: str, names: list[str], via: int | None = None) -> int:
        """``/devices register`` sent to replica ``via`` (or the next one); the new request's id."""
        text = f"register {product} {' '.join(names)}"
        answer = self.spread.to(via).command(ALICE, OPS, text) if via is not None else self.spread.command(ALICE, OPS, text)
        assert answer.status_code == 200, answer.text
        found = re.search(r"Request #(\d+)", answer.text)
        assert found, answer.text
        return int(found.group(1))

    def state(self, request_id: int) -> State | None:
        request = self.store.get(request_id)
        return request.state if request else None

    def anchor(self, request_id: int) -> dict | None:
        request = self.store.get(request_id)
        ts = request.origin_data.get("thread_ts") if request else None
        return next((m for m in self.fake.messages(OPS) if m["ts"] == ts), None) if ts else None

    def approvable(self, request_id: int) -> dict | None:
        """The request's message once it shows an Approve button."""
        message = self.anchor(request_id)
        return message if message and blocks.APPROVE in json.dumps(message.get("blocks")) else None

    def results(self, request_id: int) -> list[dict]:
        """The request's final result messages in its thread."""
        request = self.store.get(request_id)
        ts = request.origin_data.get("thread_ts") if request else None
        return [m for m in self.fake.thread(OPS, ts) if f"Request #{request_id}:" in m.get("text", "")] if ts else []

    def register_calls(self, request_id: int) -> dict[int, int]:
        """BatchRegisterDeviceWithApplyId calls the platform received, by ApplyId of the request."""
        return {c.apply_id: self.emulator.backend.application(c.apply_id).register_calls for c in self.store.chunks(request_id) if c.apply_id}

    def accounted(self, request_id: int) -> tuple[set[str], set[str]]:
        """(created on the platform, recorded as created) for the request's ApplyIds."""
        apply_ids = set(self.register_calls(request_id))
        platform = {d.device_name for d in self.emulator.backend.devices(self.store.get(request_id).product_key) if d.apply_id in apply_ids}
        return platform, {d.name for d in self.store.devices(request_id, outcome=Outcome.CREATED)}

    def posted_twice(self) -> dict[str, int]:
        """Notification posts (each carries its event and step as metadata) that appear more than once."""
        messages = self.fake.messages(OPS)
        posted = messages + [r for m in messages for r in self.fake.thread(OPS, m["ts"])[1:]]
        posted += [m for person in (ALICE, BOB, CAROL, DAVE) for m in self.fake.dm(person)]
        marks = collections.Counter(json.dumps(m["metadata"]["event_payload"], sort_keys=True) for m in posted if m.get("metadata"))
        return {mark: n for mark, n in marks.items() if n > 1}

    def assert_done_once(self, request_id: int, names: list[str]) -> None:
        """The request ended done, with every device created, recorded, registered once and told once."""
        assert self.state(request_id) == State.DONE, self.explain(request_id)
        platform, recorded = self.accounted(request_id)
        assert platform == recorded == set(names)
        calls = self.register_calls(request_id)
        assert calls and set(calls.values()) == {1}, f"register calls by ApplyId: {calls}"
        assert len(self.results(request_id)) == 1, [m.get("text") for m in self.results(request_id)]

    def explain(self, request_id: int) -> str:
        request = self.store.get(request_id)
        return f"request #{request_id}: {request.state if request else None} {request.reason if request else ''}\n{self.replicas.logs(25)}"

    def ensure_all_live(self) -> None:
        for replica in self.replicas:
            if not replica.alive:
                replica.start()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, deployment: Deployment | None = None) -> Any:
    """Poll ``condition`` until it gives a truthy value; fail naming ``what`` (and the logs) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except requests.RequestException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s" + (f"\n{deployment.replicas.logs(25)}" if deployment else ""))
        time.sleep(0.05)


@pytest.fixture(scope="module")
def deployment(pg_cluster, tmp_path_factory) -> Iterator[Deployment]:
    folder: Path = tmp_path_factory.mktemp("replicas")
    policy = folder / "policy.toml"
    policy.write_text(POLICY, encoding="utf-8")
    url = fresh_database(pg_cluster)
    emulator = Emulator(
        clock=SystemClock(), access_key_id="test-key-id", access_key_secret="test-key-secret",
        product_keys=(PLAIN, PROD), check_seconds=1.0, create_seconds=1.5, seed=20260105,
    ).start()
    fake = FakeSlack().start()
    fake.add_channel(OPS, "iot-ops")
    for person in (ALICE, BOB, CAROL, DAVE):
        fake.add_user(person)
    env = {
        **own_environ(),
        **emulator.env(),
        "SLACK_BOT_TOKEN": fake.bot_token, "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": fake.api_url,
        "IOTREG_DB": url, "IOTREG_POLICY": str(policy), "IOTREG_WORKERS": "4",
        "IOTREG_POLL_INTERVAL": "0.2", "IOTREG_POLL_MAX_INTERVAL": "0.5",
    }
    store = open_store(url)
    replicas = Replicas(3, env, folder)
    try:
        replicas.start()
        deployed = Deployment(replicas, store, emulator, fake)
        yield deployed
        print(replicas.logs(60))  # shown when a test failed
    finally:
        replicas.stop()
        store.close()
        fake.stop()
        emulator.stop()


@pytest.fixture
def deployed(deployment: Deployment) -> Deployment:
    deployment.ensure_all_live()
    return deployment


def answered(deployment: Deployment, index: int, text: str) -> str:
    """What ``/devices text`` answered on replica ``index``: in its ack or through its response_url."""
    before = len(deployment.fake.responses)
    ack = deployment.spread.to(index).command(DAVE, OPS, text)
    assert ack.status_code == 200
    if ack.content:
        return ack.json()["text"] if "json" in ack.headers.get("Content-Type", "") else ack.text
    return deployment.fake.wait_for(lambda: deployment.fake.responses[before:] and deployment.fake.responses[before].payload["text"], timeout=10)


# -- the conversation --------------------------------------------------------------------------


def test_the_conversation_spread_over_three_replicas(deployed):
    d = deployed
    names = ["spread-001", "spread-002", "spread-003"]
    request_id = d.register(PLAIN, names, via=0)
    waiting = wait_for(lambda: d.approvable(request_id), 20, "the Approve button", d)
    assert "Waiting for approval" in json.dumps(waiting.get("blocks"))
    assert d.spread.to(1).click(BOB, waiting, blocks.APPROVE).status_code == 200
    wait_for(lambda: d.results(request_id), 30, "the result in the thread", d)
    wait_for(lambda: d.state(request_id) == State.DONE, 10, "done", d)
    d.assert_done_once(request_id, names)
    assert "*3* registered" in json.dumps(d.anchor(request_id)["blocks"])

    statuses = {answered(d, i, f"status {request_id}") for i in range(3)}
    assert len(statuses) == 1 and f"Request #{request_id}" in statuses.pop()
    listings = {answered(d, i, "list") for i in range(3)}
    assert len(listings) == 1 and f"#{request_id}" in listings.pop()
    for replica in d.replicas:
        health = requests.get(f"{replica.url}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["ok"] is True and health.json()["database"] == "ok"
        assert replica.written() == [], f"replica {replica.index} wrote files of its own: {replica.written()}"
    assert d.posted_twice() == {}


def test_twenty_simultaneous_approve_clicks_on_three_replicas_approve_once(deployed):
    d = deployed
    names = ["quorum-001", "quorum-002"]
    request_id = d.register(PROD, names)
    waiting = wait_for(lambda: d.approvable(request_id), 20, "the Approve button", d)
    clickers = [(BOB, CAROL, DAVE)[i % 3] for i in range(20)]
    start = threading.Barrier(20)

    def click(n: int) -> int:
        start.wait()
        return d.spread.to(n % 3).click(clickers[n], waiting, blocks.APPROVE).status_code

    answered = lambda: sum(len(d.fake.ephemeral(OPS, u)) for u in (BOB, CAROL, DAVE))  # noqa: E731
    before = answered()
    with ThreadPoolExecutor(20) as pool:
        assert set(pool.map(click, range(20))) == {200}
    # Every click but the one that completed the quorum hears what came of it.
    wait_for(lambda: answered() - before >= 19, 15, "an answer to every click", d)
    wait_for(lambda: d.state(request_id) == State.DONE, 30, "the request done", d)
    audit = d.store.audit(request_id)
    assert len([e for e in audit if e.event == "approval"]) == 2  # two approvers of three, each once
    assert len([e for e in audit if e.event == "approved"]) == 1
    assert [e.kind for e in d.store.delivered_events(request_id)].count("approved") == 1
    wait_for(lambda: d.results(request_id), 10, "the result in the thread", d)
    d.assert_done_once(request_id, names)
    assert d.posted_twice() == {}


# -- replicas that die ---------------------------------------------------------------------------


def kill_caller(
    d: Deployment, caller: tuple[str, int] | None, phase: str, killed: list[tuple[str, int, float]], lease: str,
) -> None:
    """SIGKILL the replica that made the held call, note it, and start it again in the background.

    It is found by its end of the call's connection or, should a busy machine have let that close
    (a client's timeout, a retry), as the holder of ``lease``: the step making the call holds it."""
    assert caller is not None, f"{phase}: no call was held\n{d.replicas.logs(25)}"
    victim = d.replicas.by_address(caller)
    if victim is None:
        owners = {int(lease_.owner.split(":")[1]) for lease_ in d.store.leases() if lease_.name == lease}
        victim = next((r for r in d.replicas.replicas if r.pid in owners), None)
    assert victim is not None, f"{phase}: no replica has the connection {caller} or the lease {lease}"
    victim.kill()
    killed.append((phase, victim.index, time.monotonic()))
    threading.Thread(target=victim.start, daemon=True).start()


def approve(d: Deployment, request_id: int, approver: str = BOB) -> None:
    """``approver`` clicks Approve, and clicks again (as a person would) while the request still
    awaits approval: a click acked by a replica that died a moment later is lost with it."""
    deadline = time.monotonic() + 30
    while True:
        waiting = wait_for(lambda: d.approvable(request_id), deadline - time.monotonic(), f"the Approve button of #{request_id}", d)
        assert d.spread.click(approver, waiting, blocks.APPROVE).status_code == 200
        moved_on = time.monotonic() + 3
        while time.monotonic() < moved_on and d.state(request_id) == State.AWAITING_APPROVAL:
            time.sleep(0.05)
        if d.state(request_id) != State.AWAITING_APPROVAL:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"request #{request_id} still awaits approval after clicks for 30s\n{d.replicas.logs(25)}")


def test_a_replica_killed_in_each_phase_leaves_every_request_done_once(deployed):
    d = deployed
    platform, slack = d.emulator.server, d.fake
    killed: list[tuple[str, int, float]] = []
    names = {phase: [f"{phase}-{i:03d}" for i in range(3)] for phase in ("checking", "approval", "registering", "posting")}

    # Checking: the platform accepted the check, the replica that sent it dies before hearing so.
    held = platform.hold("BatchCheckDeviceNames", when=lambda params: names["checking"][0] in params.values())
    checking = d.register(PLAIN, names["checking"])
    kill_caller(d, held.wait_for_caller(20), "checking", killed, f"request:{checking}")
    platform.unhold("BatchCheckDeviceNames")

    # Awaiting approval: a replica dies; the click lands on one that lives.
    approval = d.register(PLAIN, names["approval"])
    wait_for(lambda: d.approvable(approval), 20, "the Approve button", d)
    victim = d.replicas[d.replicas.live()[0]]
    victim.kill()
    killed.append(("awaiting approval", victim.index, time.monotonic()))
    threading.Thread(target=victim.start, daemon=True).start()
    approve(d, approval)

    # Registering: the platform registered the ApplyId, the replica that asked dies before hearing so.
    registering = d.register(PLAIN, names["registering"])
    wait_for(lambda: d.approvable(registering), 20, "the Approve button", d)
    apply_id = str(d.store.chunks(registering)[0].apply_id)
    held = platform.hold("BatchRegisterDeviceWithApplyId", when=lambda params: params.get("ApplyId") == apply_id)
    approve(d, registering)
    kill_caller(d, held.wait_for_caller(20), "registering", killed, f"request:{registering}")
    platform.unhold("BatchRegisterDeviceWithApplyId")

    # Posting the result: the replica posting it dies while Slack takes the post (which Slack then
    # shows, the replica never hearing so).
    posting = d.register(PLAIN, names["posting"])
    post = slack.hold("chat.postMessage", when=lambda params: f"Request #{posting}:" in str(params.get("text")))
    approve(d, posting)
    kill_caller(d, slack.wait_for(lambda: post.calls and post.calls[0][0], timeout=20), "posting the result", killed, f"outbox:{posting}")
    slack.clear_faults()

    requests_by_phase = {"checking": checking, "approval": approval, "registering": registering, "posting": posting}
    deadline = max(at for _, _, at in killed) + LEASE + 15
    approve(d, checking, CAROL)
    for phase, request_id in requests_by_phase.items():
        wait_for(lambda: d.state(request_id) == State.DONE and d.results(request_id), deadline - time.monotonic(), f"request #{request_id} ({phase}) done", d)
    for phase, request_id in requests_by_phase.items():
        d.assert_done_once(request_id, names[phase])
    assert d.posted_twice() == {}
    assert [phase for phase, _, _ in killed] == ["checking", "awaiting approval", "registering", "posting the result"]


def test_a_replica_stopped_mid_request_hands_its_work_over_at_once(deployed):
    d = deployed
    names = [f"handover-{i:03d}" for i in range(3)]
    request_id = d.register(PLAIN, names)
    wait_for(lambda: d.approvable(request_id), 20, "the Approve button", d)
    apply_id = str(d.store.chunks(request_id)[0].apply_id)
    # The status polls of the creation (the check's are over).
    held = d.emulator.server.hold("QueryBatchRegisterDeviceStatus", when=lambda params: params.get("ApplyId") == apply_id)
    approve(d, request_id)
    # A status poll of the creation is in flight on one replica: stop that replica now.
    wait_for(lambda: d.register_calls(request_id) and held.callers, 20, "a status poll of the creation", d)
    stopping = d.replicas.by_address(held.callers[0])
    assert stopping is not None
    status: list[int | str | None] = []

    def stop() -> None:
        try:
            status.append(stopping.terminate(timeout=LEASE))
        except ReplicaError as exc:
            status.append(str(exc))

    began = time.monotonic()
    stopper = threading.Thread(target=stop)
    stopper.start()
    d.emulator.server.unhold("QueryBatchRegisterDeviceStatus")
    stopper.join()
    stopped = time.monotonic() - began
    assert status == [0], status
    wait_for(lambda: d.state(request_id) == State.DONE and d.results(request_id), LEASE, f"request #{request_id} done", d)
    took_over = time.monotonic() - began
    assert took_over < LEASE / 2, f"the request waited {took_over:.1f}s after SIGTERM ({stopped:.1f}s to stop): its lease was not handed back"
    d.assert_done_once(request_id, names)
    assert d.posted_twice() == {}


def test_a_replica_whose_step_outlives_the_grace_exits_at_the_grace_and_the_call_is_not_made_twice(deployed):
    """A register call whose answer does not come (the platform acted; the answer is held past
    the 8 s grace and within the client's 10 s timeout): SIGTERM stops the replica at the grace
    with status 0, its lease back at once, and another replica finishes the request by looking
    the ApplyId up, never sending the register call again."""
    d = deployed
    names = [f"outlived-{i:03d}" for i in range(3)]
    request_id = d.register(PLAIN, names)
    wait_for(lambda: d.approvable(request_id), 20, "the Approve button", d)
    apply_id = str(d.store.chunks(request_id)[0].apply_id)
    held = d.emulator.server.hold("BatchRegisterDeviceWithApplyId", when=lambda params: params.get("ApplyId") == apply_id)
    approve(d, request_id)
    stopping = d.replicas.by_address(held.wait_for_caller(20))
    assert stopping is not None
    began = time.monotonic()
    try:
        assert stopping.terminate(timeout=STOP_GRACE + 10) == 0
        stopped = time.monotonic() - began
        assert STOP_GRACE - 1 < stopped < STOP_GRACE + 5, f"stopped {stopped:.1f}s after SIGTERM"
        wait_for(lambda: d.state(request_id) == State.DONE and d.results(request_id), LEASE, f"request #{request_id} done", d)
    finally:
        d.emulator.server.unhold("BatchRegisterDeviceWithApplyId")  # an answer for nobody
    assert time.monotonic() - began < STOP_GRACE + LEASE / 2  # handed back at the exit, not run out
    d.assert_done_once(request_id, names)  # one register call for the ApplyId, one result


# -- Socket Mode ---------------------------------------------------------------------------------


def test_two_replicas_in_socket_mode_share_the_envelopes_and_ack_each_once(pg_cluster, tmp_path):
    """Each replica holds a Socket Mode connection; Slack hands every envelope to one of them."""
    emulator = Emulator(clock=SystemClock(), access_key_id="test-key-id", access_key_secret="test-key-secret",
                        product_keys=(PLAIN,), check_seconds=0.3, create_seconds=0.3).start()
    fake = FakeSlack().start()
    fake.add_channel(OPS, "iot-ops")
    env = {
        **own_environ(),
        **emulator.env(),
        "SLACK_BOT_TOKEN": fake.bot_token, "SLACK_APP_TOKEN": fake.app_token, "SLACK_API_URL": fake.api_url,
        "IOTREG_DB": fresh_database(pg_cluster), "IOTREG_APPROVERS": BOB, "IOTREG_POLL_INTERVAL": "0.2", "IOTREG_POLL_MAX_INTERVAL": "0.5",
    }
    server = fake.socket_mode
    try:
        with Replicas(2, env, tmp_path) as replicas:
            assert server.wait_for(lambda: len(server.open_peers()) == 2, timeout=20), replicas.logs()
            people = socket_workspace(fake)
            answers = [people.command(ALICE, OPS, "help") for _ in range(20)]
            assert all(a.status_code == 200 and "/devices register" in a.text for a in answers)
            answered_on = collections.Counter(ack["connection"] for ack in server.acks.values())
            assert len(answered_on) == 2 and min(answered_on.values()) >= 2, answered_on  # both replicas answered

            names = ["socket-001", "socket-002"]
            answer = people.command(ALICE, OPS, f"register {PLAIN} {' '.join(names)}")
            assert answer.status_code == 200 and "Request #1" in answer.text
            anchor = fake.wait_for(lambda: next((m for m in fake.messages(OPS) if blocks.APPROVE in json.dumps(m.get("blocks"))), None), timeout=20)
            assert people.click(BOB, anchor, blocks.APPROVE).status_code == 200
            fake.wait_for(lambda: any("Request #1:" in m.get("text", "") for m in fake.thread(OPS, anchor["ts"])), timeout=20)
            assert {d.device_name for d in emulator.backend.devices(PLAIN)} == set(names)
            assert set(server.ack_counts.values()) == {1}  # every envelope acked once, by one replica
            assert len(server.ack_counts) == 22
        assert [r.process.returncode for r in replicas] == [0, 0]
    finally:
        fake.stop()
        emulator.stop()
