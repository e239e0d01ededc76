"""What every store promises (bot/store/__init__.py), tested against each of them: SQLite and PostgreSQL.

The ``store`` fixture (tests/conftest.py) gives each test a fresh store of every kind, so each test
here runs once per store; a third store is one module and one entry in ``STORES``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from bot.domain import Approval, AuditEntry, EventKind, Kind, Origin, Outcome, RejectedLine, Rule, State, Tally, Upload
from bot.standins.postgres import free_port
from bot.store import AlreadyRead, AlreadyRetried, Store, StoreBusy, StoreUnavailable, open_store
from bot.store.postgres import PostgresStore
from bot.store.sqlite import SqliteStore

NOW = datetime(2026, 11, 22, 3, 29, 0, 123456, tzinfo=timezone.utc)
LATER = NOW + timedelta(minutes=5)


def new_request(store: Store, *, names=("dev-a", "dev-b", "dev-c"), state=State.AWAITING_APPROVAL, origin=Origin.SLACK,
                channel="C1", now=NOW, chunk_size=10_000, **options) -> int:
    names = list(names)
    chunks = [min(chunk_size, len(names) - i) for i in range(0, len(names), chunk_size)]
    return store.create_request(
        product_key="a1TestProd1", requester="U1", origin=origin, kind=Kind.NAMES, count=len(names), state=state,
        now=now, channel=channel, devices=((n, None, i + 1) for i, n in enumerate(names)), chunks=chunks,
        chunk_size=chunk_size, **options,
    )


def approve(store: Store, request_id: int, actor: str = "U2", now: datetime = LATER) -> bool:
    return store.transition(
        request_id, from_states=[State.AWAITING_APPROVAL], to_state=State.APPROVED, actor=actor, event="approved",
        now=now, detail={"by": actor}, notify=(EventKind.APPROVED, {"by": actor}), decided_by=actor, decided_at=now,
    )


# -- requests -----------------------------------------------------------------------------------


def test_a_request_comes_back_as_it_was_created(store):
    request_id = store.create_request(
        product_key="a1TestProd1", requester="U1", origin=Origin.SLACK, kind=Kind.NAMES, count=2,
        state=State.CHECKING, now=NOW, channel="C1", origin_data={"thread_ts": "1.2"},
        rejected=[(3, "bad#name", "'#' is not allowed")], devices=[("dev-a", "泵一号", 1), ("dev-b", None, 2)],
        chunks=[2], expires_at=NOW + timedelta(hours=24), event=(EventKind.CREATED, {"n": 2}),
    )
    request = store.get(request_id)
    assert (request.product_key, request.requester, request.origin, request.kind, request.state) == (
        "a1TestProd1", "U1", Origin.SLACK, Kind.NAMES, State.CHECKING)
    assert (request.count, request.rejected_count, request.channel, request.origin_data) == (2, 1, "C1", {"thread_ts": "1.2"})
    assert request.created_at == request.updated_at == request.phase_started_at == NOW
    assert request.expires_at == NOW + timedelta(hours=24) and request.expires_at.tzinfo == timezone.utc
    assert request.created_at.utcoffset() == timedelta(0)
    assert store.rejected_lines(request_id) == [RejectedLine(3, "bad#name", "'#' is not allowed")]
    assert [(c.chunk_no, c.size, c.apply_id, c.register_sent_at) for c in store.chunks(request_id)] == [(0, 2, None, None)]
    assert store.audit(request_id) == [AuditEntry(request_id, NOW, "U1", "requested", {"product_key": "a1TestProd1", "count": 2})]
    assert [(e.kind, e.payload, e.attempts, e.next_at) for e in store.pending_events()] == [(EventKind.CREATED, {"n": 2}, 0, NOW)]
    assert store.get(request_id + 1) is None


def test_requests_are_listed_newest_first_by_state_channel_and_origin(store):
    first = new_request(store, channel="C1")
    second = new_request(store, channel="C2", origin=Origin.CLI)
    third = new_request(store, channel="C1", state=State.CHECKING)
    assert [r.id for r in store.requests()] == [third, second, first]
    assert [r.id for r in store.requests(limit=2)] == [third, second]
    assert [r.id for r in store.requests(limit=None)] == [third, second, first]
    assert [r.id for r in store.requests(channel="C1")] == [third, first]
    assert [r.id for r in store.requests(origins=[Origin.CLI])] == [second]
    assert [r.id for r in store.requests(states=[State.CHECKING, State.DONE])] == [third]
    assert store.requests(states=[]) == []


def test_state_counts_leave_out_states_with_no_request(store):
    assert store.state_counts() == {}
    for _ in range(3):
        new_request(store)
    approve(store, new_request(store))
    assert store.state_counts() == {State.AWAITING_APPROVAL: 3, State.APPROVED: 1}


def test_figures_count_requests_by_state_waiting_events_and_devices_created(store):
    assert (store.figures().requests_by_state, store.figures().outbox_pending, store.figures().devices_created) == ({}, 0, 0)
    one = new_request(store, event=(EventKind.CREATED, {}))
    approve(store, new_request(store))
    store.set_outcomes(one, [("dev-a", Outcome.CREATED, None, "iot-a"), ("dev-b", Outcome.NOT_CREATED, "no", None)])
    figures = store.figures()
    assert figures.requests_by_state == {State.AWAITING_APPROVAL: 1, State.APPROVED: 1} == store.state_counts()
    assert (figures.outbox_pending, figures.devices_created) == (2, 1)


def test_every_request_created_or_moved_is_one_log_line(store, caplog):
    caplog.set_level(logging.INFO, logger="bot.store")
    request_id = new_request(store, rejected=[(7, "bad#1", "'#' is not allowed", "泵")])
    approve(store, request_id)
    assert not approve(store, request_id)  # no move, no line
    lines = [(r.request_id, r.state, r.event, r.devices, r.rejected, r.actor) for r in caplog.records if r.name == "bot.store"]
    assert lines == [(request_id, "awaiting_approval", "requested", 3, 1, "U1"), (request_id, "approved", "approved", 3, 1, "U2")]
    assert store.rejected_lines(request_id) == [RejectedLine(7, "bad#1", "'#' is not allowed", "泵")]


# -- transitions --------------------------------------------------------------------------------

MOVES = [
    (State.CHECKING, State.AWAITING_APPROVAL),
    (State.CHECKING, State.CHECK_FAILED),
    (State.AWAITING_APPROVAL, State.APPROVED),
    (State.AWAITING_APPROVAL, State.REJECTED),
    (State.AWAITING_APPROVAL, State.CANCELLED),
    (State.AWAITING_APPROVAL, State.EXPIRED),
    (State.APPROVED, State.REGISTERING),
    (State.REGISTERING, State.DONE),
    (State.REGISTERING, State.FAILED),
]


@pytest.mark.parametrize(("before", "after"), MOVES, ids=[f"{a}-{b}" for a, b in MOVES])
def test_each_transition_happens_from_its_state_with_its_audit_row_and_event(store, before, after):
    request_id = new_request(store, state=before)
    moved = store.transition(
        request_id, from_states=[before], to_state=after, actor="U2", event=str(after), now=LATER,
        detail={"why": "because"}, notify=(EventKind.PROGRESS, {"to": str(after)}), reason="a reason", polls=0,
    )
    assert moved
    request = store.get(request_id)
    assert (request.state, request.reason, request.updated_at) == (after, "a reason", LATER)
    assert store.audit(request_id)[-1] == AuditEntry(request_id, LATER, "U2", str(after), {"why": "because"})
    assert [e.payload for e in store.pending_events()][-1] == {"to": str(after)}


@pytest.mark.parametrize(("before", "after"), MOVES, ids=[f"{a}-{b}" for a, b in MOVES])
def test_a_transition_from_any_other_state_changes_nothing_and_records_nothing(store, before, after):
    others = [s for s in State if s != before]
    for state in others:
        request_id = new_request(store, state=state)
        audit, events = len(store.audit()), store.pending_count()
        assert not store.transition(
            request_id, from_states=[before], to_state=after, actor="U2", event="moved", now=LATER,
            notify=(EventKind.PROGRESS, {}), reason="should not be written",
        )
        request = store.get(request_id)
        assert (request.state, request.reason, request.updated_at) == (state, None, NOW)
        assert (len(store.audit()), store.pending_count()) == (audit, events)


def test_a_second_approval_loses_and_the_first_keeps_its_decision(store):
    request_id = new_request(store)
    assert approve(store, request_id, "U2")
    assert not approve(store, request_id, "U3", now=LATER + timedelta(seconds=1))
    request = store.get(request_id)
    assert (request.decided_by, request.decided_at) == ("U2", LATER)
    assert [a.actor for a in store.audit(request_id)] == ["U1", "U2"]


def test_a_transition_for_a_request_that_does_not_exist_is_refused(store):
    assert not store.transition(999, from_states=[State.CHECKING], to_state=State.APPROVED, actor="U2", event="x", now=NOW)
    assert store.audit() == []


def test_bookkeeping_updates_change_only_the_fields_given(store):
    request_id = new_request(store)
    store.update_request(request_id, polls=3, errors_in_row=2, phase_started_at=LATER)
    request = store.get(request_id)
    assert (request.polls, request.errors_in_row, request.phase_started_at, request.state) == (3, 2, LATER, State.AWAITING_APPROVAL)
    store.update_request(request_id)  # nothing to change
    assert store.get(request_id) == request


def test_origin_data_is_merged_and_a_none_removes_a_key(store):
    request_id = new_request(store, origin_data={"thread_ts": "1.2", "error": "channel_not_found"})
    store.update_origin_data(request_id, message_ts="3.4", error=None)
    assert store.get(request_id).origin_data == {"thread_ts": "1.2", "message_ts": "3.4"}
    store.update_origin_data(request_id, thread_ts="5.6", note={"说明": "🚀 ok", "n": [1, 2]})
    assert store.get(request_id).origin_data == {"thread_ts": "5.6", "message_ts": "3.4", "note": {"说明": "🚀 ok", "n": [1, 2]}}
    store.update_origin_data(999, thread_ts="x")  # no such request: nothing happens


def test_unicode_survives_in_names_nicknames_reasons_and_json(store):
    names = [("sensor-01", "一号车间冷却泵"), ("ｓｅｎ-02", "センサー_二"), ("dev:03@x", None)]
    request_id = store.create_request(
        product_key="a1TestProd1", requester="U1", origin=Origin.SLACK, kind=Kind.NAMES, count=3,
        state=State.CHECKING, now=NOW, devices=[(n, nick, i) for i, (n, nick) in enumerate(names)], chunks=[3],
        rejected=[(9, "sensor hz 🚫", "a space is not allowed: « »")], origin_data={"标题": "注册 ✔"},
        event=(EventKind.CREATED, {"who": "Zoë", "emoji": "🔥"}),
    )
    store.set_outcomes(request_id, [("ｓｅｎ-02", Outcome.INVALID, "名称已存在。", None)])
    store.record(request_id, "U—2", "denied", LATER, {"reason": "n’est pas approbateur", "list": ["ä", "€"]})
    assert store.device_names(request_id) == names
    assert store.devices(request_id, outcome=Outcome.INVALID)[0].reason == "名称已存在。"
    assert store.rejected_lines(request_id)[0].value == "sensor hz 🚫"
    assert store.get(request_id).origin_data == {"标题": "注册 ✔"}
    assert next(store.pending_events()).payload == {"who": "Zoë", "emoji": "🔥"}
    assert store.audit(request_id)[-1].detail == {"reason": "n’est pas approbateur", "list": ["ä", "€"]}
    assert store.audit(request_id)[-1].actor == "U—2"


def test_a_request_keeps_its_rule_reason_and_an_automatic_decision(store):
    rule = Rule(approvers=("U2", "S0OPS"), approvals=2, reason_required=True, auto_approve_max=5, source="product a1TestProd1")
    request_id = new_request(store, rule=rule, justification="new line 3 sensors · 第三条线", decided_by="iotreg",
                             audit=[("auto_approved", {"max": 5})])
    request = store.get(request_id)
    assert (request.rule, request.justification, request.decided_by, request.decided_at) == (rule, "new line 3 sensors · 第三条线", "iotreg", NOW)
    assert (request.retried_as, request.reminders_sent) == (None, 0)
    assert [(a.actor, a.event, a.detail) for a in store.audit(request_id)] == [
        ("U1", "requested", {"product_key": "a1TestProd1", "count": 3, "rule": "product a1TestProd1", "reason": "new line 3 sensors · 第三条线"}),
        ("iotreg", "auto_approved", {"max": 5}),
    ]
    assert store.get(new_request(store)).rule is None


def test_requests_of_one_requester(store):
    mine = new_request(store)
    store.create_request(product_key="a1TestProd1", requester="U9", origin=Origin.SLACK, kind=Kind.COUNT, count=1,
                         state=State.CHECKING, now=NOW)
    assert [r.id for r in store.requests(requester="U1")] == [mine]


def test_a_failed_check_is_retried_once_however_often_it_is_clicked(store):
    failed = new_request(store, state=State.CHECK_FAILED)
    retry = new_request(store, retry_of=failed)
    assert store.get(failed).retried_as == retry and store.get(retry).retry_of == failed
    requests, audit = len(store.requests(limit=None)), len(store.audit())
    with pytest.raises(AlreadyRetried) as caught:
        new_request(store, retry_of=failed, names=["dev-x", "dev-y"])
    assert (caught.value.request_id, caught.value.retried_as) == (failed, retry)
    assert (len(store.requests(limit=None)), len(store.audit())) == (requests, audit)  # nothing of the second was kept


def test_approvals_are_counted_once_each_and_the_quorum_approves(store):
    request_id = new_request(store)
    assert store.add_approval(request_id, approver="U2", now=NOW, needed=2, reason="checked the list") == Tally.COUNTED
    assert store.add_approval(request_id, approver="U2", now=LATER, needed=2) == Tally.ALREADY_COUNTED
    assert store.get(request_id).state == State.AWAITING_APPROVAL
    assert store.add_approval(request_id, approver="U3", now=LATER, needed=2) == Tally.QUORUM
    request = store.get(request_id)
    assert (request.state, request.decided_by, request.decided_at) == (State.APPROVED, "U3", LATER)
    assert store.approvals(request_id) == [Approval("U2", NOW, "checked the list"), Approval("U3", LATER, None)]
    assert store.add_approval(request_id, approver="U4", now=LATER, needed=2) == Tally.CLOSED
    assert [a.event for a in store.audit(request_id)] == ["requested", "approval", "approval", "approved"]
    assert store.audit(request_id)[-1].detail == {"approvers": ["U2", "U3"], "needed": 2}
    assert [(e.kind, e.payload) for e in store.pending_events()] == [
        (EventKind.APPROVAL, {"by": "U2", "count": 1, "needed": 2}),
        (EventKind.APPROVED, {"by": "U3", "approvers": ["U2", "U3"]})]
    assert store.add_approval(999, approver="U2", now=NOW, needed=1) == Tally.CLOSED


def test_eight_approvers_at_once_reach_a_quorum_of_three_exactly_once(store):
    request_id = new_request(store)
    start = threading.Barrier(8)
    tallies: list[Tally] = []

    def click(n: int) -> None:
        start.wait(timeout=30)
        tallies.append(store.add_approval(request_id, approver=f"U{n}", now=NOW + timedelta(seconds=n), needed=3))

    threads = [threading.Thread(target=click, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(tallies) == sorted([Tally.COUNTED] * 2 + [Tally.QUORUM] + [Tally.CLOSED] * 5)
    assert len(store.approvals(request_id)) == 3
    assert [a.event for a in store.audit(request_id)].count("approved") == 1


def test_each_reminder_is_sent_once_and_only_while_the_request_waits(store):
    request_id = new_request(store)
    assert store.add_reminder(request_id, sent=1, now=LATER, payload={"n": 1})
    assert not store.add_reminder(request_id, sent=1, now=LATER, payload={"n": 1})
    assert not store.add_reminder(request_id, sent=3, now=LATER, payload={"n": 3})
    assert store.get(request_id).reminders_sent == 1
    approve(store, request_id)
    assert not store.add_reminder(request_id, sent=2, now=LATER, payload={"n": 2})
    assert [a.event for a in store.audit(request_id)] == ["requested", "reminded", "approved"]
    assert [e.kind for e in store.pending_events()] == [EventKind.REMINDER, EventKind.APPROVED]


# -- chunks, claims and devices -----------------------------------------------------------------


def test_a_register_call_is_claimed_once_and_taken_over_only_from_the_claim_seen(store):
    request_id = new_request(store)
    assert store.take_lease(f"request:{request_id}", "pid-1", NOW, NOW + timedelta(seconds=10))
    assert store.claim_register(request_id, 0, "pid-1", NOW)
    for owner in ("pid-2", "pid-3"):  # both run steps of the request later, one after the other
        assert store.take_lease(f"request:{request_id}", owner, LATER, LATER + timedelta(seconds=10))
        store.release_lease(f"request:{request_id}", owner)
    store.take_lease(f"request:{request_id}", "pid-2", LATER, LATER + timedelta(seconds=10))
    assert not store.claim_register(request_id, 0, "pid-2", LATER)
    chunk = store.chunks(request_id)[0]
    assert (chunk.register_sent_at, chunk.claimed_by) == (NOW, "pid-1")
    assert not store.claim_register(request_id, 0, "pid-2", LATER, replacing=NOW - timedelta(microseconds=1))
    assert store.claim_register(request_id, 0, "pid-2", LATER, replacing=NOW)
    assert not store.claim_register(request_id, 0, "pid-3", LATER, replacing=NOW)  # that claim is gone
    store.release_register(request_id, 0, "pid-1")  # not its claim any more: nothing changes
    assert store.chunks(request_id)[0].claimed_by == "pid-2"
    store.release_register(request_id, 0, "pid-2")
    chunk = store.chunks(request_id)[0]
    assert (chunk.register_sent_at, chunk.claimed_by) == (None, None)
    assert not store.claim_register(request_id, 0, "pid-3", LATER)  # it does not hold the request's lease
    store.release_lease(f"request:{request_id}", "pid-2")
    assert store.take_lease(f"request:{request_id}", "pid-3", LATER, LATER + timedelta(seconds=10))
    assert store.claim_register(request_id, 0, "pid-3", LATER)


def test_a_register_call_is_claimed_only_under_a_live_lease_on_its_request(store):
    request_id = new_request(store)
    assert not store.claim_register(request_id, 0, "pid-1", NOW)  # no lease
    assert store.take_lease(f"request:{request_id}", "pid-1", NOW, NOW + timedelta(seconds=10))
    assert not store.claim_register(request_id, 0, "pid-1", NOW + timedelta(seconds=10))  # it ran out
    assert store.claim_register(request_id, 0, "pid-1", NOW + timedelta(seconds=9))


def test_chunks_are_updated_and_found_by_apply_id(store):
    request_id = new_request(store, names=[f"dev-{i:04d}" for i in range(25)], chunk_size=10)
    store.update_chunk(request_id, 1, apply_id=4242, status="CHECK", register_confirmed_at=LATER)
    store.update_chunk(request_id, 2, error="refused")
    chunk = store.chunk_for_apply_id(4242)
    assert (chunk.request_id, chunk.chunk_no, chunk.size, chunk.status, chunk.register_confirmed_at) == (request_id, 1, 10, "CHECK", LATER)
    assert [c.size for c in store.chunks(request_id)] == [10, 10, 5]
    assert store.chunks(request_id)[2].error == "refused"
    assert store.chunk_for_apply_id(4243) is None


def test_devices_keep_the_order_they_were_given_in(store):
    names = ["zeta-001", "alpha-02", "mid-0003", "beta-004", "aaaa-005"]
    request_id = new_request(store, names=names, chunk_size=2)
    assert [n for n, _ in store.device_names(request_id)] == names
    assert [n for n, _ in store.device_names(request_id, 1)] == ["mid-0003", "beta-004"]
    assert [(d.name, d.chunk_no, d.line) for d in store.devices(request_id)] == [(n, i // 2, i + 1) for i, n in enumerate(names)]
    assert [d.name for d in store.devices(request_id, limit=2)] == names[:2]


def test_outcomes_reasons_and_counts(store):
    request_id = new_request(store, names=["dev-a", "dev-b", "dev-c", "dev-d"])
    store.set_outcomes(request_id, [("dev-a", Outcome.CREATED, None, "iot-a"), ("dev-b", Outcome.NOT_CREATED, None, None),
                                    ("dev-c", Outcome.NOT_CREATED, "quota", None)])
    store.set_outcomes(request_id, [("dev-a", Outcome.CREATED, None, None)])  # an iot_id once known is kept
    store.set_reasons(request_id, Outcome.NOT_CREATED, "Failed to create the device.")
    assert store.outcome_counts(request_id) == {Outcome.CREATED: 1, Outcome.NOT_CREATED: 2, Outcome.PENDING: 1}
    by_name = {d.name: d for d in store.devices(request_id)}
    assert by_name["dev-a"].iot_id == "iot-a"
    assert (by_name["dev-b"].reason, by_name["dev-c"].reason) == ("Failed to create the device.", "quota")
    assert [d.name for d in store.devices(request_id, outcome=Outcome.NOT_CREATED)] == ["dev-b", "dev-c"]


def test_devices_named_by_the_platform_are_added_once_in_the_order_recorded(store):
    request_id = store.create_request(product_key="a1TestProd1", requester="U1", origin=Origin.CLI, kind=Kind.COUNT,
                                      count=3, state=State.REGISTERING, now=NOW, chunks=[3])
    store.add_devices(request_id, 0, [("zz-plat-1", Outcome.CREATED, "iot-1"), ("aa-plat-2", Outcome.CREATED, "iot-2")])
    store.set_outcomes(request_id, [("zz-plat-1", Outcome.CREATED, "kept", None)])
    store.add_devices(request_id, 0, [("zz-plat-1", Outcome.NOT_CREATED, "other"), ("mm-plat-3", Outcome.CREATED, "iot-3")])
    assert [(d.name, d.outcome, d.reason, d.iot_id) for d in store.devices(request_id)] == [
        ("zz-plat-1", Outcome.CREATED, "kept", "iot-1"), ("aa-plat-2", Outcome.CREATED, None, "iot-2"),
        ("mm-plat-3", Outcome.CREATED, None, "iot-3")]


def test_a_hundred_thousand_names_in_one_request(store):
    names = [f"sensor-{i:06d}" for i in range(100_000)]
    started = time.perf_counter()
    request_id = new_request(store, names=reversed(names))
    elapsed = time.perf_counter() - started
    assert [c.size for c in store.chunks(request_id)] == [10_000] * 10
    stored = store.device_names(request_id)
    assert len(stored) == 100_000 and stored[0][0] == names[-1] and stored[-1][0] == names[0]
    assert [n for n, _ in store.device_names(request_id, 9)] == names[9_999::-1]
    store.set_outcomes(request_id, [(n, Outcome.CREATED, None, f"iot-{n}") for n in names[:10_000]])
    assert store.outcome_counts(request_id) == {Outcome.CREATED: 10_000, Outcome.PENDING: 90_000}
    assert elapsed < 15, f"100,000 names took {elapsed:.1f} s"  # bench/bench_store.py measures it: ~1 s


# -- uploads ------------------------------------------------------------------------------------


def test_an_upload_is_read_once_and_the_request_made_from_it_marks_it_read(store):
    first = store.add_upload(user="U1", channel="C1", product_key="a1TestProd1", pasted="dev-a dev-b",
                             origin_data={"files": [{"id": "F1", "name": "列表.csv"}]}, now=NOW)
    second = store.add_upload(user="U2", channel="C2", product_key="a1TestProd1", pasted="", origin_data={}, now=NOW)
    assert store.upload(first) == Upload(first, "U1", "C1", "a1TestProd1", "dev-a dev-b", {"files": [{"id": "F1", "name": "列表.csv"}]})
    assert [u.id for u in store.unread_uploads()] == [first, second]
    new_request(store, upload_id=first)
    assert store.upload(first) is None
    store.finish_upload(second, LATER)
    assert store.upload(second) is None and store.unread_uploads() == []
    # Read a second time (by another process, say): no second request.
    made = len(store.requests(limit=None))
    with pytest.raises(AlreadyRead):
        new_request(store, upload_id=first)
    assert len(store.requests(limit=None)) == made


# -- audit and outbox ---------------------------------------------------------------------------


def test_audit_rows_and_events_come_oldest_first(store):
    one, two = new_request(store), new_request(store, origin=Origin.CLI)
    store.record(two, "U9", "denied", LATER, {"why": "not an approver"})
    approve(store, one)
    store.enqueue(two, EventKind.PROGRESS, {"done": 1}, LATER)
    assert [(a.request_id, a.event) for a in store.audit()] == [(one, "requested"), (two, "requested"), (two, "denied"), (one, "approved")]
    assert [a.event for a in store.audit(two)] == ["requested", "denied"]
    assert len(store.audit(limit=2)) == 2
    assert [(e.request_id, e.kind) for e in store.pending_events()] == [(one, EventKind.APPROVED), (two, EventKind.PROGRESS)]
    assert [e.request_id for e in store.pending_events([Origin.CLI])] == [two]


def test_the_outbox_counts_delivers_retries_and_remembers_steps(store):
    one, two = new_request(store), new_request(store, origin=Origin.CLI)
    assert (store.pending_count(), store.next_event_time()) == (0, None)
    store.enqueue(one, EventKind.CREATED, {}, NOW)
    store.enqueue(one, EventKind.PROGRESS, {}, NOW + timedelta(seconds=1))
    store.enqueue(two, EventKind.CREATED, {}, NOW + timedelta(seconds=2))
    assert (store.pending_count(), store.pending_count([Origin.CLI]), store.pending_count([Origin.SLACK])) == (3, 1, 2)
    first, second, third = list(store.pending_events())
    assert store.next_event_time() == NOW
    store.mark_failed(first.id, "slack said no " * 100, NOW + timedelta(minutes=1))
    # The request's first event waits; its second may not overtake it: the next is the other request's.
    assert store.next_event_time() == NOW + timedelta(seconds=2)
    assert store.next_event_time([Origin.SLACK]) == NOW + timedelta(minutes=1)
    assert next(store.pending_events()).attempts == 1
    assert not store.step_done(first.id, "post")
    store.mark_step(first.id, "post")
    store.mark_step(first.id, "post")
    assert store.step_done(first.id, "post") and not store.step_done(first.id, "thread")
    store.mark_delivered(first.id, LATER)
    assert store.next_event_time([Origin.SLACK]) == NOW + timedelta(seconds=1)
    assert [e.id for e in store.delivered_events(one)] == [first.id]
    assert store.pending_count() == 2


def test_a_step_begun_says_when_to_the_next_attempt(store):
    one = new_request(store)
    store.enqueue(one, EventKind.CREATED, {}, NOW)
    event = next(store.pending_events())
    assert store.begin_step(event.id, "result", NOW) is None  # the first attempt
    # A second attempt (after a crash) learns when the first began, whatever time it is now.
    assert store.begin_step(event.id, "result", LATER) == NOW
    assert store.begin_step(event.id, "result", LATER) == NOW
    assert store.begin_step(event.id, "notice", LATER) is None
    assert not store.step_done(event.id, "result")  # begun is not done


# -- concurrency --------------------------------------------------------------------------------


def in_threads(attempt, n: int = 8) -> list[bool]:
    """``attempt(i)`` in ``n`` threads let go at once; what each returned, sorted."""
    start = threading.Barrier(n)
    wins: list[bool] = []

    def run(i: int) -> None:
        start.wait(timeout=30)
        wins.append(attempt(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return sorted(wins)


def test_two_threads_racing_for_one_approval_register_it_once(store):
    request_id = new_request(store)
    assert in_threads(lambda n: approve(store, request_id, f"U{n}")) == [False] * 7 + [True]
    assert [a.event for a in store.audit(request_id)] == ["requested", "approved"]
    assert store.pending_count() == 1


# A process that opens the store (or, for "open", waits to open it), says "ready", and on a line
# from its standard input approves the request (or opens the store) and prints what happened.
RACER = """
import sys
from datetime import datetime
from bot.domain import EventKind, State
from bot.store import open_store

location, action, *rest = sys.argv[1:]
store = open_store(location) if action == "approve" else None
print("ready", flush=True)
sys.stdin.readline()
if action == "approve":
    request_id, actor, now = int(rest[0]), rest[1], datetime.fromisoformat(rest[2])
    won = store.transition(
        request_id, from_states=[State.AWAITING_APPROVAL], to_state=State.APPROVED, actor=actor, event="approved",
        now=now, detail={"by": actor}, notify=(EventKind.APPROVED, {"by": actor}), decided_by=actor, decided_at=now,
    )
    print(f"{actor} {'won' if won else 'lost'}", flush=True)
else:
    store = open_store(location)
    print(",".join(store.schema_version()), flush=True)
store.close()
"""


def in_processes(*argvs: list[str]) -> list[str]:
    """Run RACER once per ``argv``, let them all go at once when all are ready; each one's answer."""
    processes = [
        subprocess.Popen([sys.executable, "-c", RACER, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for argv in argvs
    ]
    try:
        for p in processes:
            assert p.stdout.readline().strip() == "ready"
        for p in processes:
            p.stdin.write("go\n")
            p.stdin.flush()
        answers = [p.stdout.readline().strip() for p in processes]
        for p in processes:
            assert p.wait(timeout=60) == 0
        return answers
    finally:
        for p in processes:
            p.kill()


def test_two_processes_racing_for_one_approval_register_it_once(store, store_location):
    request_id = new_request(store)
    answers = in_processes(*([store_location, "approve", str(request_id), actor, LATER.isoformat()] for actor in ("U2", "U3")))
    assert sorted(a.split()[1] for a in answers) == ["lost", "won"]
    winner = next(a.split()[0] for a in answers if a.endswith("won"))
    assert store.get(request_id).decided_by == winner
    assert [a.actor for a in store.audit(request_id)] == ["U1", winner]
    assert store.pending_count() == 1


def test_two_processes_starting_at_once_migrate_once(store_location):
    versions = [v.split(",") for v in in_processes([store_location, "open"], [store_location, "open"])]
    store = open_store(store_location)
    try:
        assert versions[0] == versions[1] == store.schema_version() != []
        assert len(set(store.schema_version())) == len(store.schema_version())
        new_request(store)  # and the schema works
    finally:
        store.close()


def test_a_store_held_to_serve_is_shared_only_if_it_can_be(store, store_location):
    store.hold("serve")
    store.hold("serve")  # again, by the same process: fine
    second = open_store(store_location)
    try:
        if isinstance(store, SqliteStore):  # one process per SQLite file: the second is told what to use
            with pytest.raises(StoreBusy, match="PostgreSQL"):
                second.hold("serve")
            second.hold("cli")  # another purpose
        else:
            second.hold("serve")
        new_request(second)
    finally:
        second.close()


# -- PostgreSQL's own failures ------------------------------------------------------------------


def test_an_unreachable_postgres_is_named_in_one_line_without_its_password():
    url = f"postgresql://iotreg:s3cret-pw@127.0.0.1:{free_port()}/iotreg_prod"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        open_store(url)
    message = str(caught.value)
    assert time.monotonic() - started < 10
    assert "\n" not in message and "s3cret-pw" not in message
    assert "127.0.0.1" in message and "iotreg_prod" in message and str(url.split(":")[3].split("/")[0]) in message


def test_postgres_restarted_mid_run_fails_calls_clearly_and_loses_nothing(pg_cluster, postgres_url, caplog):
    caplog.set_level(logging.DEBUG)
    url = postgres_url.replace("iotreg@", "iotreg:s3cret-pw@")  # the test server trusts; the password goes unused
    store = PostgresStore(url, timeout=1)
    assert "s3cret-pw" not in repr(store) and "s3cret-pw" not in store.location
    try:
        request_id = new_request(store)
        pg_cluster.stop()
        try:
            for call in (lambda: store.get(request_id), lambda: approve(store, request_id), store.ping):
                with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{pg_cluster.port}/") as caught:
                    call()
                assert "s3cret-pw" not in str(caught.value) and "\n" not in str(caught.value)
        finally:
            pg_cluster.start()
        deadline = time.monotonic() + 30
        while True:  # the pool reconnects on its own
            try:
                store.ping()
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not reconnect within 30 s"
        assert store.get(request_id).state == State.AWAITING_APPROVAL
        assert approve(store, request_id)
        assert [a.event for a in store.audit(request_id)] == ["requested", "approved"]
    finally:
        store.close()
    assert caplog.records and not [r for r in caplog.records if "s3cret-pw" in r.getMessage()]


# -- leases and due steps: several processes on one database ------------------------------------


def test_a_lease_has_one_holder_until_it_is_given_back_or_runs_out(store):
    until = NOW + timedelta(seconds=10)
    assert store.take_lease("request:1", "a", NOW, until)
    assert not store.take_lease("request:1", "b", NOW + timedelta(seconds=5), until)
    assert store.take_lease("request:1", "a", NOW + timedelta(seconds=5), NOW + timedelta(seconds=15))  # its holder again
    assert store.take_lease("request:2", "b", NOW, until)  # another piece of work
    assert [(lease.name, lease.owner, lease.until) for lease in store.leases()] == [
        ("request:1", "a", NOW + timedelta(seconds=15)), ("request:2", "b", until)]
    assert not store.take_lease("request:1", "b", NOW + timedelta(seconds=14), until)  # renewed: still a's
    assert store.take_lease("request:1", "b", NOW + timedelta(seconds=15), NOW + timedelta(seconds=25))  # ran out
    store.release_lease("request:1", "a")  # no longer a's: nothing happens
    assert [lease.owner for lease in store.leases()] == ["b", "b"]
    store.release_lease("request:1", "b")
    assert store.take_lease("request:1", "a", NOW + timedelta(seconds=16), until)


def test_leases_are_renewed_and_handed_back_per_owner(store):
    for name in ("request:1", "outbox:1"):
        assert store.take_lease(name, "a", NOW, NOW + timedelta(seconds=10))
    assert store.take_lease("request:2", "b", NOW, NOW + timedelta(seconds=10))
    assert store.renew_leases("a", NOW + timedelta(seconds=30)) == {"request:1", "outbox:1"}
    assert not store.take_lease("outbox:1", "b", NOW + timedelta(seconds=20), NOW + timedelta(seconds=30))
    assert store.release_leases("a") == 2
    assert store.take_lease("outbox:1", "b", NOW + timedelta(seconds=20), NOW + timedelta(seconds=30))
    assert store.renew_leases("a", NOW + timedelta(seconds=40)) == set()


def test_of_many_threads_taking_one_lease_exactly_one_holds_it(store):
    assert in_threads(lambda n: store.take_lease("request:7", f"owner-{n}", NOW, NOW + timedelta(seconds=10))) == [False] * 7 + [True]
    assert len(store.leases()) == 1


def test_a_step_is_due_when_asked_for_and_the_earliest_wake_stands(store):
    request_id = new_request(store, state=State.CHECKING)
    assert store.due_requests(NOW) == [request_id]  # due from its creation, in the same transaction
    turn = store.begin_request_step(request_id, NOW, NOW + timedelta(seconds=10))
    store.end_request_step(request_id, turn, NOW + timedelta(hours=1))  # the step: nothing to do for an hour
    assert store.due_requests(NOW) == []
    store.wake_request(request_id, LATER)
    store.wake_request(request_id, NOW + timedelta(minutes=1))
    store.wake_request(request_id, NOW + timedelta(minutes=9))  # later than the one asked for: no change
    assert store.due_requests(NOW) == []
    assert store.due_requests(NOW + timedelta(minutes=1)) == [request_id]
    turn = store.begin_request_step(request_id, NOW, NOW + timedelta(seconds=10))
    assert (turn.due, turn.due_at) == (False, NOW + timedelta(minutes=1))  # not yet: another process stepped it
    turn = store.begin_request_step(request_id, NOW + timedelta(minutes=1), NOW + timedelta(minutes=1, seconds=10))
    assert turn.due
    # While the step runs its due time is the fallback: if its process dies, the step is due then.
    assert store.due_requests(NOW + timedelta(minutes=1)) == []
    assert store.due_requests(NOW + timedelta(minutes=1, seconds=10)) == [request_id]
    assert store.end_request_step(request_id, turn, NOW + timedelta(minutes=3)) == NOW + timedelta(minutes=3)
    assert store.due_requests(NOW + timedelta(minutes=2, seconds=59)) == []
    assert store.due_requests(NOW + timedelta(minutes=3)) == [request_id]


def test_a_wake_during_a_step_is_kept_when_the_step_ends(store):
    request_id = new_request(store)
    turn = store.begin_request_step(request_id, NOW, NOW + timedelta(seconds=10))
    store.wake_request(request_id, NOW + timedelta(seconds=1))  # an approval on another replica
    # The step saw it waiting for approval; the stepping process learns it is due at the wake's time.
    assert store.end_request_step(request_id, turn, NOW + timedelta(hours=24)) == NOW + timedelta(seconds=1)
    assert store.due_requests(NOW + timedelta(seconds=1)) == [request_id]
    turn = store.begin_request_step(request_id, NOW + timedelta(seconds=1), NOW + timedelta(seconds=11))
    assert store.end_request_step(request_id, turn, None) is None  # the request ended
    assert store.due_requests(NOW + timedelta(days=9)) == []


def test_due_steps_held_by_a_live_lease_are_not_swept(store):
    first, second = new_request(store), new_request(store, origin=Origin.CLI)
    for request_id in (first, second):
        store.wake_request(request_id, NOW)
    assert store.due_requests(NOW) == [first, second]
    assert store.due_requests(NOW, origins=[Origin.CLI]) == [second]
    assert store.due_requests(NOW, limit=1) == [first]
    store.take_lease(f"request:{first}", "a", NOW, NOW + timedelta(seconds=10))
    assert store.due_requests(NOW + timedelta(seconds=9)) == [second]
    assert store.due_requests(NOW + timedelta(seconds=10)) == [first, second]  # its holder is gone


def test_the_next_event_of_a_request_is_read_afresh(store):
    request_id = new_request(store)
    approve(store, request_id)
    store.enqueue(request_id, "progress", {"n": 1}, LATER)
    first = store.next_event(request_id)
    assert first.kind == EventKind.APPROVED and first.next_at == LATER
    store.mark_delivered(first.id, LATER)
    assert store.next_event(request_id).payload == {"n": 1}
    store.mark_delivered(store.next_event(request_id).id, LATER)
    assert store.next_event(request_id) is None
# -- IotIds read after the result ---------------------------------------------------------------


def finished(store: Store, request_id: int, state: State = State.DONE) -> None:
    assert store.transition(request_id, from_states=[State.AWAITING_APPROVAL], to_state=state, actor="iotreg", event="finished", now=LATER)


def test_iot_ids_are_set_on_created_devices_only_and_leave_outcomes_and_reasons_alone(store):
    request_id = new_request(store, names=["dev-a", "dev-b", "dev-c", "dev-d"], chunk_size=2)
    store.update_chunk(request_id, 0, status="CREATE_FAILED")
    store.set_outcomes(request_id, [("dev-a", Outcome.CREATED, None, None), ("dev-b", Outcome.NOT_CREATED, "The device name already exists.", None)])
    assert store.chunks(request_id)[0].iot_ids_read_at is None

    matched = store.set_iot_ids(request_id, 0, [("dev-a", "iot-a"), ("dev-b", "iot-b"), ("not-ours", "iot-x")], LATER)
    assert matched == 1  # dev-b did not get created, and not-ours is no device of the request
    assert [(d.name, d.outcome, d.reason, d.iot_id) for d in store.devices(request_id)] == [
        ("dev-a", Outcome.CREATED, None, "iot-a"), ("dev-b", Outcome.NOT_CREATED, "The device name already exists.", None),
        ("dev-c", Outcome.PENDING, None, None), ("dev-d", Outcome.PENDING, None, None)]
    assert [c.iot_ids_read_at for c in store.chunks(request_id)] == [LATER, None]
    store.set_iot_ids(request_id, 1, [], LATER)  # a part whose IotIds could not be read is marked all the same
    assert [c.iot_ids_read_at for c in store.chunks(request_id)] == [LATER, LATER]


def test_finished_requests_with_iot_ids_to_read_are_found_for_a_restart(store):
    done = new_request(store, names=["dev-a", "dev-b"], chunk_size=1)
    failed = new_request(store, names=["dev-c"], origin=Origin.CLI)
    running = new_request(store, names=["dev-d"])
    read = new_request(store, names=["dev-e"])
    checked = new_request(store, names=["dev-f"])
    for request_id in (done, failed, running, read):
        store.update_chunk(request_id, 0, status="CREATE_SUCCESS")
    store.update_chunk(done, 1, status="CREATE_FAILED")
    store.update_chunk(checked, 0, status="CHECK_SUCCESS")
    store.set_iot_ids(read, 0, [("dev-e", "iot-e")], LATER)
    finished(store, done)
    finished(store, failed, State.FAILED)
    finished(store, read)
    finished(store, checked, State.FAILED)  # its creation never began: nothing to read

    assert store.unread_iot_ids() == [done, failed]  # the unfinished one is resumed as such
    assert store.unread_iot_ids(origins=[Origin.CLI]) == [failed]
    store.set_iot_ids(done, 0, [], LATER)
    assert store.unread_iot_ids() == [done, failed]  # one part of it is still unread
    store.set_iot_ids(done, 1, [], LATER)
    assert store.unread_iot_ids(origins=[Origin.SLACK, Origin.CLI]) == [failed]


def test_an_approval_makes_the_next_step_due_in_its_own_transaction(store):
    by_click, by_quorum, finished = new_request(store), new_request(store), new_request(store, state=State.DONE)
    assert sorted(store.due_requests(NOW)) == [by_click, by_quorum]  # the finished one is due for nothing
    for request_id in (by_click, by_quorum):  # each waits for its approver, up to a day
        store.end_request_step(request_id, store.begin_request_step(request_id, NOW, NOW), NOW + timedelta(hours=24))
    assert store.due_requests(LATER) == []
    assert approve(store, by_click, now=LATER)
    assert store.add_approval(by_quorum, approver="U2", now=LATER, needed=1) == Tally.QUORUM
    assert sorted(store.due_requests(LATER)) == [by_click, by_quorum]
# -- the IoT Platform quotas, shared by every process of a database ----------------------------


def calls_in_any_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    return max(sum(1 for t in starts if first <= t < first + window - 1e-9) for first in starts)


def test_quotas_are_seeded_once_and_overridden_with_what_changed(store):
    assert store.quotas() == {}
    assert store.set_quotas({"BatchCheckDeviceNames": 10, "QueryPageByApplyId": 50}, replace=False) == {
        "BatchCheckDeviceNames": (None, 10), "QueryPageByApplyId": (None, 50)}
    # Another process seeding the defaults changes nothing; an override changes only what differs.
    assert store.set_quotas({"BatchCheckDeviceNames": 10, "QueryPageByApplyId": 50}, replace=False) == {}
    assert store.set_quotas({"BatchCheckDeviceNames": 4, "QueryPageByApplyId": 50}) == {"BatchCheckDeviceNames": (10, 4)}
    assert store.set_quotas({"BatchCheckDeviceNames": 10}, replace=False) == {}
    assert store.quotas() == {"BatchCheckDeviceNames": 4, "QueryPageByApplyId": 50}
    with pytest.raises(ValueError, match="BatchCheckDeviceNames must be above 0"):
        store.set_quotas({"BatchCheckDeviceNames": 0})
    assert store.quotas()["BatchCheckDeviceNames"] == 4


def test_booking_slots_keeps_every_window_within_the_stored_quota(store):
    store.set_quotas({"BatchCheckDeviceNames": 2})
    assert store.book_slot("QueryDeviceDetail", 0.5) is None  # no quota: not limited
    slots = [store.book_slot("BatchCheckDeviceNames", 0.5) for _ in range(5)]
    assert [s.wait for s in slots[:2]] == [0.0, 0.0]
    # Two to a window of 2 / 2 * 1.5 s, counted from the slots (not from when they were asked for).
    assert [s.start - slots[0].start for s in slots] == pytest.approx([0, slots[1].start - slots[0].start, 1.5, 1.5 + (slots[1].start - slots[0].start), 3.0])
    assert 1.2 < slots[2].wait <= 1.5 and 2.7 < slots[4].wait <= 3.0
    assert {s.qps for s in slots} == {2}
    # A quota changed by any process applies from the next booking.
    store.set_quotas({"BatchCheckDeviceNames": 100})
    assert store.book_slot("BatchCheckDeviceNames", 0.5).wait == 0.0
    store.set_quotas({"BatchCheckDeviceNames": 0.5})  # one call per 2 s (and the margin)
    last = store.book_slot("BatchCheckDeviceNames", 0.0)
    assert store.book_slot("BatchCheckDeviceNames", 0.0).start == pytest.approx(last.start + 2.0)


def test_slots_booked_with_a_spacing_are_that_share_of_a_slot_apart_and_windows_stay_full(store):
    store.set_quotas({"BatchCheckDeviceNames": 4})
    slots = [store.book_slot("BatchCheckDeviceNames", 0.0, spacing=0.5) for _ in range(9)]
    starts = [s.start - slots[0].start for s in slots]
    # A slot's time is 1 / 4 s: the first window's four go 0.125 s apart, then four to every second.
    assert starts == pytest.approx([0, 0.125, 0.25, 0.375, 1.0, 1.125, 1.25, 1.375, 2.0], abs=1e-6)
    assert slots[3].wait == pytest.approx(0.375, abs=0.1)


def test_a_late_holders_slot_moves_to_now_and_its_lanes_later_slots_after_it(store):
    store.set_quotas({"BatchCheckDeviceNames": 2})  # two lanes, each a slot a second
    a, b = (store.book_slot("BatchCheckDeviceNames", 0.0) for _ in range(2))
    c, d = (store.book_slot("BatchCheckDeviceNames", 0.0) for _ in range(2))
    assert [c.ticket - a.ticket, d.ticket - a.ticket, c.start - a.start, d.start - b.start] == pytest.approx([2, 3, 1.0, 1.0])
    back = store.book_slot("BatchCheckDeviceNames", 0.0, retake=a.ticket)  # a's holder comes late
    assert back.retaken and back.wait == 0.0 and back.ticket == a.ticket and back.start > a.start
    # c, a window after a in its lane, moves with it; d, in the other lane, stays.
    assert store.slot_of("BatchCheckDeviceNames", c.ticket).start == pytest.approx(back.start + 1.0)
    assert store.slot_of("BatchCheckDeviceNames", d.ticket).start == d.start
    e = store.book_slot("BatchCheckDeviceNames", 0.0)  # in the lane that has room soonest: d's
    assert e.ticket == d.ticket + 1 and e.start == pytest.approx(b.start + 2.0)
    assert calls_in_any_window([back.start, b.start, back.start + 1.0, d.start, e.start], 1.0) == 2
    read = store.slot_of("BatchCheckDeviceNames", e.ticket)
    assert (read.start, read.qps, read.ticket) == (e.start, 2, e.ticket) and read.wait == pytest.approx(e.wait, abs=0.5)
    assert store.slot_of("BatchCheckDeviceNames", e.ticket + 1) is None  # not handed out yet
    assert store.slot_of("QueryProductList", 1) is None  # no quota


def test_a_call_that_went_late_counts_its_slot_from_then_and_its_lane_after_it(store):
    store.set_quotas({"BatchCheckDeviceNames": 2})
    a, b, c, d = (store.book_slot("BatchCheckDeviceNames", 0.0) for _ in range(4))
    store.slot_went("BatchCheckDeviceNames", a.ticket, a.start + 0.3, 0.0)  # a's call left 0.3 s late
    assert store.slot_of("BatchCheckDeviceNames", a.ticket).start == pytest.approx(a.start + 0.3)
    assert store.slot_of("BatchCheckDeviceNames", c.ticket).start == pytest.approx(a.start + 1.3)  # its lane
    assert store.slot_of("BatchCheckDeviceNames", d.ticket).start == d.start  # the other lane
    store.slot_went("BatchCheckDeviceNames", b.ticket, b.start - 0.1, 0.0)  # not later than its slot: nothing
    store.slot_went("BatchCheckDeviceNames", d.ticket + 5, d.start + 1, 0.0)  # not handed out: nothing
    assert store.slot_of("BatchCheckDeviceNames", b.ticket).start == b.start
    assert store.book_slot("BatchCheckDeviceNames", 0.0).start == pytest.approx(b.start + 2.0)  # the other lane first
    assert store.book_slot("BatchCheckDeviceNames", 0.0).start == pytest.approx(a.start + 2.3)


def test_a_holder_later_than_half_a_window_loses_its_slot_and_books_a_new_one(store):
    # One call in any 0.1 s (a margin of -0.9 on one a second): half a window is 50 ms.
    store.set_quotas({"BatchCheckDeviceNames": 1})
    a = store.book_slot("BatchCheckDeviceNames", -0.9)
    b = store.book_slot("BatchCheckDeviceNames", -0.9)
    assert b.start == pytest.approx(a.start + 0.1)
    time.sleep(0.2)  # b's holder comes 0.1 s late, or more
    again = store.book_slot("BatchCheckDeviceNames", -0.9, retake=b.ticket)
    assert not again.retaken and again.ticket == b.ticket + 1 and again.wait == 0.0
    assert store.slot_of("BatchCheckDeviceNames", a.ticket) is None  # forgotten, too old to move


def test_a_quota_lowered_and_raised_again_keeps_every_window_within_the_quota(store):
    """Slots booked ahead under the first quota keep their lanes: lanes given back by a raise wait
    for them, and so does every lane for a late call of a lane the lowering dropped."""
    book = lambda: store.book_slot("BatchCheckDeviceNames", 0.05).ticket  # noqa: E731
    store.set_quotas({"BatchCheckDeviceNames": 10})
    tickets = [book() for _ in range(30)]  # three windows ahead
    store.set_quotas({"BatchCheckDeviceNames": 5})
    tickets.append(book())
    moved = tickets[7]  # in the eighth of the ten lanes, which the lowering dropped: its call is late
    store.slot_went("BatchCheckDeviceNames", moved, store.slot_of("BatchCheckDeviceNames", moved).start + 0.3, 0.05)
    tickets += [book() for _ in range(4)]
    store.set_quotas({"BatchCheckDeviceNames": 10})  # the typo mended
    tickets += [book() for _ in range(15)]
    starts = [store.slot_of("BatchCheckDeviceNames", ticket).start for ticket in tickets]
    assert calls_in_any_window(starts, 1.05) == 10


def test_slots_booked_by_the_previous_version_by_their_start_share_the_schedule(postgres_url):
    """A replica of the previous version books through ``iotreg_book_slot`` and retakes by a slot's
    start while a deploy rolls: its slots are tickets of the same schedule. (One process serves a
    SQLite file: no previous version runs beside it.)"""
    store = PostgresStore(postgres_url)
    try:
        store.set_quotas({"BatchCheckDeviceNames": 1})
        with store._borrowed() as conn:  # noqa: SLF001 - the previous version's own statement
            old = conn.execute("SELECT * FROM iotreg_book_slot(%s, %s, %s, %s)", ["BatchCheckDeviceNames", 0.0, None, 0.2]).fetchone()
            new = store.book_slot("BatchCheckDeviceNames", 0.0)
            assert new.start == pytest.approx(old[1] + 1.0) and new.ticket >= 2
            moved = conn.execute("SELECT * FROM iotreg_book_slot(%s, %s, %s)", ["BatchCheckDeviceNames", 0.0, old[1]]).fetchone()
        assert moved[3] and moved[1] > old[1]  # retaken: moved to now, and the new version's slot after it
        assert store.slot_of("BatchCheckDeviceNames", new.ticket).start == pytest.approx(moved[1] + 1.0)
    finally:
        store.close()


def test_processes_booking_at_once_share_one_schedule(store, store_location):
    """Two stores on one database (as two replicas), four threads each: the slots they get together
    keep every window within the quota, and neither waits behind the other's whole queue."""
    store.set_quotas({"BatchCheckDeviceNames": 10})
    other = open_store(store_location)
    starts: dict[str, list[float]] = {"one": [], "other": []}
    lock = threading.Lock()
    begin = threading.Barrier(8)

    def book(name: str, replica: Store) -> None:
        replica.quotas()  # each thread's connection opened before the race, not in it
        begin.wait()
        for _ in range(5):
            slot = replica.book_slot("BatchCheckDeviceNames", 0.0)
            with lock:
                starts[name].append(slot.start)

    threads = [threading.Thread(target=book, args=(n, s)) for n, s in [("one", store), ("other", other)] for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        other.close()
    every = starts["one"] + starts["other"]
    assert len(every) == 40 and calls_in_any_window(every, 1.0) == 10
    first_ten = sorted(every)[9] - min(every)  # the first ten go at once, as they are asked for
    assert 3.0 <= max(every) - min(every) <= 3.0 + first_ten + 1e-6  # 40 at 10/s: no slot lost, none doubled
    # First come, first served (PostgreSQL queues the bookings on the quota's row; SQLite's busy
    # handler lets writers retry in no order, one process serving it): each replica had slots in
    # the first and the last second.
    for name in starts if store.many_processes else ():
        assert min(starts[name]) < min(every) + 1.0 and max(starts[name]) > max(every) - 1.0
