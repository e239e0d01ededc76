"""`iotreg db copy`: a SQLite deployment moved to PostgreSQL with its whole history, and working there."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from bot.aliyun.client import Credentials, IotClient, RetryPolicy
from bot.aliyun.ratelimit import RateLimiter
from bot.cli import cli
from bot.config import DEFAULT_QPS
from bot.domain import EventKind, Outcome, RejectedLine, State
from bot.jobs import InlineJobs
from bot.domain import Timing
from bot.registration import Workflow
from bot.store.copy import CopyError, copy_sqlite_to_postgres
from bot.store.postgres import TABLES, PostgresStore
from bot.store.sqlite import SqliteStore

ALICE, BOB = "U0ALICE", "U0BOB"


class Quiet:
    """A front end that accepts every notification."""

    def deliver(self, event) -> None:
        pass


def workflow_over(store, emulator) -> tuple[Workflow, InlineJobs]:
    clock = emulator.clock
    client = IotClient(
        emulator.endpoint, Credentials(emulator.access_key_id, emulator.access_key_secret), clock=clock,
        limiter=RateLimiter(DEFAULT_QPS, clock), retry=RetryPolicy(max_attempts=4, deadline=30),
    )
    workflow = Workflow(
        store, client, clock, Timing(poll_interval=1.0, poll_max_interval=4.0, approval_ttl=3600, phase_timeout=600),
        notifier=lambda _: Quiet(), jobs=lambda steps: InlineJobs(clock, steps),
    )
    return workflow, workflow.jobs


def run_until(workflow: Workflow, jobs: InlineJobs, request_id: int, *states: State) -> State:
    jobs.run_until(lambda: workflow.store.get(request_id).state in states)
    jobs.run_due()
    return workflow.store.get(request_id).state


@pytest.fixture
def deployment(tmp_path, emulator):
    """A SQLite deployment with history: one request registered, one waiting for approval, one
    rejected, an upload read and one not, a delivery half done and an event not delivered yet."""
    path = tmp_path / "iotreg.db"
    workflow, jobs = workflow_over(SqliteStore(path), emulator)
    store = workflow.store
    done = workflow.requests.submit(emulator.product_key, ALICE, [f"meter-{i:04d}" for i in range(25)], origin="cli",
                           rejected=[], rejected_count=0)
    run_until(workflow, jobs, done.id, State.AWAITING_APPROVAL)
    workflow.requests.approve(done.id, BOB)
    assert run_until(workflow, jobs, done.id, State.DONE) == State.DONE
    upload = store.add_upload(user=ALICE, channel="C1", product_key=emulator.product_key, pasted="", origin_data={"files": [{"id": "F1"}]}, now=emulator.clock.now())
    store.add_upload(user=BOB, channel="C2", product_key=emulator.product_key, pasted="valve-0001", origin_data={}, now=emulator.clock.now())
    waiting = workflow.requests.submit(emulator.product_key, ALICE, [f"valve-{i:04d}" for i in range(12)], origin="cli", upload_id=upload)
    run_until(workflow, jobs, waiting.id, State.AWAITING_APPROVAL)
    rejected = workflow.requests.submit(emulator.product_key, ALICE, ["pump-0001", "pump-0002"], origin="cli",
                               rejected=[RejectedLine(3, "bad#one", "'#' is not allowed")])
    run_until(workflow, jobs, rejected.id, State.AWAITING_APPROVAL)
    workflow.requests.reject(rejected.id, BOB, "not this week")
    store.enqueue(waiting.id, EventKind.PROGRESS, {"note": "still waiting"}, emulator.clock.now())
    pending = list(store.pending_events())[-1]
    store.mark_step(pending.id, "post")
    store.begin_step(pending.id, "thread", emulator.clock.now())  # begun, then cut short
    store.mark_failed(pending.id, "slack said no", emulator.clock.now() + timedelta(seconds=30))
    workflow.close()
    return path, {"done": done.id, "waiting": waiting.id, "rejected": rejected.id}


def test_a_copy_holds_the_whole_history_as_the_sqlite_store_shows_it(deployment, postgres_url):
    path, ids = deployment
    copied = copy_sqlite_to_postgres(path, postgres_url)
    assert {c.table: c.source for c in copied} == {c.table: c.target for c in copied}
    assert {c.table for c in copied if c.source} == set(TABLES)  # the deployment has rows in every table
    before, after = SqliteStore(path), PostgresStore(postgres_url)
    try:
        assert after.requests(limit=None) == before.requests(limit=None)
        assert after.state_counts() == before.state_counts() == {State.DONE: 1, State.AWAITING_APPROVAL: 1, State.REJECTED: 1}
        for request_id in ids.values():
            assert after.chunks(request_id) == before.chunks(request_id)
            assert after.devices(request_id) == before.devices(request_id)
            assert after.rejected_lines(request_id) == before.rejected_lines(request_id)
            assert after.approvals(request_id) == before.approvals(request_id)
            assert after.audit(request_id) == before.audit(request_id)
            assert after.delivered_events(request_id) == before.delivered_events(request_id)
        assert list(after.pending_events()) == list(before.pending_events())
        assert after.next_event_time() == before.next_event_time()
        event = list(after.pending_events())[-1]
        assert after.step_done(event.id, "post") and event.attempts == 1
        begun = before.begin_step(event.id, "thread", datetime.now(timezone.utc))
        assert begun is not None and after.begin_step(event.id, "thread", datetime.now(timezone.utc)) == begun
        assert after.unread_uploads() == before.unread_uploads() and len(after.unread_uploads()) == 1
        assert after.outcome_counts(ids["done"]) == {Outcome.CREATED: 25}
    finally:
        before.close()
        after.close()


def test_a_copied_deployment_goes_on_working(deployment, postgres_url, emulator):
    path, ids = deployment
    copy_sqlite_to_postgres(path, postgres_url)
    workflow, jobs = workflow_over(PostgresStore(postgres_url), emulator)
    try:
        workflow.resume()
        workflow.requests.approve(ids["waiting"], BOB)
        assert run_until(workflow, jobs, ids["waiting"], State.DONE) == State.DONE
        assert workflow.store.outcome_counts(ids["waiting"]) == {Outcome.CREATED: 12}
        new = workflow.requests.submit(emulator.product_key, ALICE, ["gauge-0001"], origin="cli")
        assert new.id == max(ids.values()) + 1
        assert [a.event for a in workflow.store.audit(new.id)] == ["requested"]
        emulator.clock.advance(60)  # past the retry time of the delivery that failed in SQLite
        jobs.run_due()
        assert workflow.store.pending_count() == 0  # it went out too, with the new request's
    finally:
        workflow.close()


def test_iotreg_db_copy_prints_the_counts_and_refuses_a_database_that_is_not_empty(deployment, postgres_url, monkeypatch, tmp_path):
    path, _ = deployment
    monkeypatch.chdir(tmp_path)
    password_url = postgres_url.replace("iotreg@", "iotreg:hunter2-pw@")  # trust auth ignores it
    result = CliRunner().invoke(cli, ["db", "copy", "--to", password_url], env={"IOTREG_DB": str(path)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "hunter2-pw" not in result.output and "iotreg:***@" in lines[0]
    assert any(line.split()[:3] == ["requests", "3", "3"] for line in lines)
    assert any(line.split()[0] == "devices" and line.split()[1] == line.split()[2] == "39" for line in lines)
    again = CliRunner().invoke(cli, ["db", "copy", "--from", str(path), "--to", password_url])
    assert again.exit_code == 1
    message = again.output.strip()
    assert message.startswith("Error: ") and "not empty (3 requests" in message and "\n" not in message
    assert "hunter2-pw" not in message


def test_a_missing_source_or_a_non_postgres_target_is_refused_in_one_line(tmp_path, postgres_url):
    with pytest.raises(CopyError, match="no SQLite database at"):
        copy_sqlite_to_postgres(tmp_path / "nothing.db", postgres_url)
    assert not (tmp_path / "nothing.db").exists()
    result = CliRunner().invoke(cli, ["db", "copy", "--from", str(tmp_path / "x.db"), "--to", str(tmp_path / "y.db")])
    assert result.exit_code == 2 and "expected a postgresql:// URL" in result.output


def test_a_deployment_that_iotreg_serves_is_not_copied(deployment, postgres_url):
    path, _ = deployment
    serving = SqliteStore(path)
    serving.hold("serve")
    try:
        with pytest.raises(CopyError, match="iotreg serve is running on .*: stop it, then copy"):
            copy_sqlite_to_postgres(path, postgres_url)
    finally:
        serving.close()
    assert {c.table: c.target for c in copy_sqlite_to_postgres(path, postgres_url)}["requests"] == 3  # once stopped
