"""The embedded store: one SQLite file (see :mod:`bot.store` for what every store promises).

* One connection per thread (Bolt listeners, scheduler jobs and the CLI run in different threads),
  in WAL mode, so readers never block the writer and a killed process leaves a consistent file.
* Compare-and-set is a single ``UPDATE … WHERE state IN (…)`` inside ``BEGIN IMMEDIATE``.
* The schema is built by numbered migrations (sqlite-utils ``Migrations``), applied at start
  under the write lock, so two processes starting at once migrate one after the other.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from sqlite_utils import Database, Migrations

from bot.domain import (
    Approval,
    AuditEntry,
    Chunk,
    DeviceRow,
    Event,
    EventKind,
    Kind,
    Origin,
    Outcome,
    RejectedLine,
    Request,
    Rule,
    State,
    SYSTEM,
    Tally,
    Upload,
)
from bot.slots import FREE, Schedule
from bot.store import CREATION_ENDED, AlreadyRead, AlreadyRetried, Figures, Lease, Slot, StepTurn, StoreBusy, StoreUnavailable, log_transition


PENDING = Outcome.PENDING.value

migrations = Migrations("iotreg")


@migrations()
def m001_initial(db: Database) -> None:
    db["requests"].create(
        {
            "id": int,
            "product_key": str,
            "requester": str,
            "origin": str,  # "slack" or "cli"
            "channel": str,
            "thread_ts": str,
            "kind": str,  # "names" or "count"
            "count": int,  # devices asked for
            "rejected_count": int,  # lines refused locally before any API call
            "state": str,
            "reason": str,  # why it failed, or was rejected / cancelled
            "decided_by": str,
            "decided_at": str,
            "expires_at": str,
            "retry_of": int,
            "polls": int,  # status polls since the phase began, for back-off
            "phase_started_at": str,
            "errors_in_row": int,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null={"product_key", "requester", "origin", "kind", "state", "created_at", "updated_at"},
        defaults={"count": 0, "rejected_count": 0, "polls": 0, "errors_in_row": 0, "channel": "", "thread_ts": ""},
    )
    db["requests"].create_index(["state"])
    db["requests"].create_index(["channel", "id"])
    db["chunks"].create(
        {
            "request_id": int,
            "chunk_no": int,
            "size": int,
            "apply_id": int,
            "status": str,  # the platform's ApplyStatus last seen
            "register_sent_at": str,  # written BEFORE the register call: see registration.py
            "register_confirmed_at": str,
            "error": str,
        },
        pk=("request_id", "chunk_no"),
        foreign_keys=[("request_id", "requests", "id")],
    )
    db["chunks"].create_index(["apply_id"], unique=True)
    db["devices"].create(
        {
            "request_id": int,
            "name": str,
            "nickname": str,
            "chunk_no": int,
            "line": int,
            "outcome": str,
            "reason": str,
            "iot_id": str,
        },
        pk=("request_id", "name"),
        foreign_keys=[("request_id", "requests", "id")],
        defaults={"outcome": PENDING},
    )
    db["devices"].create_index(["request_id", "chunk_no"])
    db["rejected_lines"].create(
        {"request_id": int, "line": int, "value": str, "reason": str},
        foreign_keys=[("request_id", "requests", "id")],
    )
    db["rejected_lines"].create_index(["request_id"])
    db["audit"].create(
        {"id": int, "request_id": int, "at": str, "actor": str, "event": str, "detail": str},
        pk="id",
    )
    db["audit"].create_index(["request_id", "id"])
    db["outbox"].create(
        {"id": int, "request_id": int, "kind": str, "payload": str, "created_at": str, "attempts": int, "next_at": str, "delivered_at": str, "last_error": str},
        pk="id",
        defaults={"attempts": 0},
    )
    db["outbox"].create_index(["delivered_at", "next_at"])


@migrations()
def m002_register_claim_owner(db: Database) -> None:
    """Who claimed a register call, so another process can tell a live call from a crashed one."""
    db["chunks"].add_column("claimed_by", str)


@migrations()
def m003_notification_steps(db: Database) -> None:
    """Steps of a notification already done (so a redelivery repeats none), and a request's
    Slack channel that turned out unusable."""
    db["notified_steps"].create({"event_id": int, "step": str}, pk=("event_id", "step"))
    db["requests"].add_column("slack_error", str)


@migrations()
def m004_uploads(db: Database) -> None:
    """Device lists submitted in Slack, recorded before the submission is acknowledged."""
    db["uploads"].create(
        {"id": int, "user": str, "channel": str, "product_key": str, "files": str, "pasted": str,
         "created_at": str, "done_at": str, "request_id": int},
        pk="id",
    )
    db["uploads"].create_index(["done_at"])


@migrations()
def m005_origin_data(db: Database) -> None:
    """Front-end data the core does not read moves into one field per request and per upload:
    the Slack thread and channel error of a request, the Slack files of an upload. (The old
    columns stay, unread, so an older iotreg still running during a deploy keeps working.)"""
    db["requests"].add_column("origin_data", str)
    db["uploads"].add_column("origin_data", str)
    rows = db.conn.execute("SELECT id, thread_ts, slack_error FROM requests").fetchall()
    db.conn.executemany(
        "UPDATE requests SET origin_data = ? WHERE id = ?",
        [(json.dumps({k: v for k, v in (("thread_ts", ts), ("error", err)) if v}), rid) for rid, ts, err in rows],
    )
    rows = db.conn.execute("SELECT id, files FROM uploads").fetchall()
    db.conn.executemany(
        "UPDATE uploads SET origin_data = ? WHERE id = ?",
        [(json.dumps({"files": json.loads(files or "[]")}), uid) for uid, files in rows],
    )


@migrations()
def m006_approvals(db: Database) -> None:
    """Approvals by more than one person, the rule each request is decided under, the requester's
    reason, which request retried a failed check, and the reminders sent."""
    db["approvals"].create(
        {"request_id": int, "approver": str, "at": str, "reason": str},
        pk=("request_id", "approver"),
        foreign_keys=[("request_id", "requests", "id")],
    )
    db["requests"].add_column("rule", str)  # JSON of the Rule
    db["requests"].add_column("justification", str)
    db["requests"].add_column("retried_as", int)
    db["requests"].add_column("reminders_sent", int, not_null_default=0)


@migrations()
def m007_rejected_nicknames(db: Database) -> None:
    """The nickname given beside a line refused locally, for the outcome report."""
    db["rejected_lines"].add_column("nickname", str)


@migrations()
def m008_begun_steps(db: Database) -> None:
    """A notification step that posts is marked begun before it posts, so that a redelivery after a
    crash between Slack's answer and ``notified_steps`` looks for the message before posting again."""
    db["begun_steps"].create({"event_id": int, "step": str, "begun_at": str}, pk=("event_id", "step"))


@migrations()
def m009_leases(db: Database) -> None:
    """Leases on shared work, and each request's next due step, so that several processes on one
    database (PostgreSQL; SQLite serves one) run each step once. Columns are added, none changed:
    an older iotreg still running beside them ignores them."""
    db["leases"].create({"name": str, "owner": str, "until": str}, pk="name")
    db.execute("ALTER TABLE requests ADD COLUMN next_step_at TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN wakes INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE INDEX requests_next_step_at ON requests (next_step_at) WHERE next_step_at IS NOT NULL")
    unfinished = ", ".join(f"'{s}'" for s in State if not s.final)
    db.execute(f"UPDATE requests SET next_step_at = updated_at WHERE state IN ({unfinished})")  # due: swept at once


@migrations()
def m010_iot_ids_read(db: Database) -> None:
    """When a chunk's IotIds were read. A request's result no longer waits for them; chunks whose
    creation ended before this column existed had theirs read before their result."""
    db["chunks"].add_column("iot_ids_read_at", str)
    db.conn.execute(
        "UPDATE chunks SET iot_ids_read_at = COALESCE(register_confirmed_at, ?) WHERE status IN (?, ?)",
        [format_time(datetime.now(timezone.utc)), *CREATION_ENDED],
    )


@migrations()
def m011_quotas(db: Database) -> None:
    """The IoT Platform quotas and their latest slots (see :meth:`SqliteStore.book_slot`)."""
    db["quotas"].create({"action": str, "qps": float, "granted": str, "changed_at": str}, pk="action", not_null={"qps", "granted"})


@migrations()
def m012_slot_tickets(db: Database) -> None:
    """Slots as numbered tickets in lanes (see :mod:`bot.slots`): ``granted`` holds the slots of
    tickets ``last_ticket - len(granted) + 1`` to ``last_ticket``, ``lanes`` their lanes (JSON),
    ``lane_last`` each lane's latest start and ``spaced`` the last ticket's start as booked. The
    latest slots kept so far become one lane each."""
    db["quotas"].add_column("last_ticket", int, not_null_default=0)
    db["quotas"].add_column("lanes", str, not_null_default="[]")
    db["quotas"].add_column("lane_last", str, not_null_default="[]")
    db["quotas"].add_column("spaced", float)  # NULL: none booked yet
    for action, granted in db.execute("SELECT action, granted FROM quotas").fetchall():
        starts = json.loads(granted)
        db.execute(
            "UPDATE quotas SET last_ticket = ?, lanes = ?, lane_last = ?, spaced = ? WHERE action = ?",
            [len(starts), json.dumps(list(range(len(starts)))), granted, max(starts, default=None), action],
        )


def format_time(value: datetime) -> str:
    """Times are stored as ISO 8601 UTC text, which sorts and compares correctly as text."""
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _stored(fields: dict[str, Any]) -> dict[str, Any]:
    """Column values as stored: times as text."""
    return {k: format_time(v) if isinstance(v, datetime) else v for k, v in fields.items()}


def _assignments(values: dict[str, Any]) -> str:
    """``a = ?, b = ?`` for column names of our own (never from input)."""
    return ", ".join(f"{column} = ?" for column in values)


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


_REQUEST_TIMES = ("decided_at", "expires_at", "phase_started_at", "created_at", "updated_at")


def _request(row: dict[str, Any]) -> Request:
    return Request(
        id=row["id"],
        product_key=row["product_key"],
        requester=row["requester"],
        origin=Origin(row["origin"]),
        channel=row["channel"] or "",
        kind=Kind(row["kind"]),
        count=row["count"] or 0,
        rejected_count=row["rejected_count"] or 0,
        state=State(row["state"]),
        reason=row["reason"],
        decided_by=row["decided_by"],
        retry_of=row["retry_of"],
        polls=row["polls"] or 0,
        errors_in_row=row["errors_in_row"] or 0,
        origin_data=json.loads(row["origin_data"] or "{}"),
        rule=Rule.from_dict(json.loads(row["rule"])) if row.get("rule") else None,
        justification=row.get("justification"),
        retried_as=row.get("retried_as"),
        reminders_sent=row.get("reminders_sent") or 0,
        **{key: parse_time(row[key]) for key in _REQUEST_TIMES},  # type: ignore[arg-type]
    )


def _chunk(row: dict[str, Any]) -> Chunk:
    return Chunk(
        request_id=row["request_id"],
        chunk_no=row["chunk_no"],
        size=row["size"],
        apply_id=row["apply_id"],
        status=row["status"],
        register_sent_at=parse_time(row["register_sent_at"]),
        register_confirmed_at=parse_time(row["register_confirmed_at"]),
        error=row["error"],
        claimed_by=row["claimed_by"],
        iot_ids_read_at=parse_time(row.get("iot_ids_read_at")),
    )


def _in(values: Iterable[Any]) -> tuple[str, list[str]]:
    """``(?, ?, …)`` and the values as text, for an ``IN`` of our own values."""
    values = [str(v) for v in values]
    return f"({', '.join('?' * len(values))})", values


#: Seconds a store being opened waits for another process's hold on a new file or on the schema.
OPEN_TIMEOUT = 30.0


class SqliteStore:
    """The SQLite database behind the workflow. Safe to share between threads, not between processes
    that run the workflow (a second ``iotreg serve`` on one file is refused)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.location = self.path
        self.reads_in_process = True
        self.many_processes = False
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._held: dict[str, IO[str]] = {}
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                with self._write():  # two processes starting at once migrate one after the other
                    migrations.apply(self.db)
                return
            except sqlite3.OperationalError as exc:
                # Switching a new file to WAL, or a schema change under way in another process,
                # can answer "locked" at once rather than through the busy timeout: try again.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    self.close()
                    raise StoreUnavailable(f"cannot open the SQLite database {self.path}: {exc}") from None
                self.close()
                time.sleep(0.05)
            except sqlite3.Error as exc:
                self.close()
                raise StoreUnavailable(f"cannot open the SQLite database {self.path}: {exc}") from None

    # -- connections --------------------------------------------------------------------------

    @property
    def db(self) -> Database:
        """This thread's connection, opened on first use."""
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives a power cut too, not only a process crash. A register claim
            # that a power cut undid could let a call that did go out be sent again.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            db = self._local.db = Database(conn)
            with self._connections_lock:
                self._connections.append(conn)
        return db

    @contextmanager
    def _write(self) -> Iterator[Database]:
        """A write transaction that takes the write lock first (``BEGIN IMMEDIATE``).

        A deferred ``BEGIN`` reads first and fails at once with "database is locked" when another
        process wrote in between; an immediate one waits its turn (up to the 30 s busy timeout).
        Nested calls (sqlite-utils' own ``atomic``) become savepoints inside it.
        """
        db = self.db
        if db.conn.in_transaction:
            with db.atomic():
                yield db
            return
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.conn.rollback()
            raise
        db.conn.commit()

    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, by plain SQL: sqlite-utils' table objects look the schema up on every
        use (a query for the view names, one for the table names), which the hot paths skip."""
        cursor = self.db.conn.execute(sql, args)
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]

    def _update(self, table: str, where: str, args: Sequence[Any], fields: dict[str, Any]) -> None:
        """Set ``fields`` on the rows of ``table`` that match ``where`` (both of our own, never input)."""
        values = _stored(fields)
        if values:
            with self._write() as db:
                db.conn.execute(f"UPDATE {table} SET {_assignments(values)} WHERE {where}", [*values.values(), *args])

    def close(self) -> None:
        for handle in self._held.values():
            handle.close()  # releases the lock
        self._held.clear()
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def schema_version(self) -> list[str]:
        return [m.name for m in migrations.applied(self.db)]

    def hold(self, purpose: str) -> None:
        """One process per purpose and file: a lock on ``<file>.<purpose>.lock``, which the operating
        system drops when the process ends, however it ends (so a killed bot never blocks the next)."""
        if purpose in self._held:
            return
        lock_path = f"{self.path}.{purpose}.lock"
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreBusy(
                f"another iotreg process already runs `{purpose}` on the SQLite database {self.path}; "
                "SQLite serves one process: for more than one, use PostgreSQL (IOTREG_DB=postgresql://…)"
            ) from None
        self._held[purpose] = handle

    def ping(self) -> None:
        try:
            self.db.conn.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the SQLite database {self.path} does not answer: {exc}") from None

    # -- requests -----------------------------------------------------------------------------

    def create_request(
        self,
        *,
        product_key: str,
        requester: str,
        origin: Origin,
        kind: Kind,
        count: int,
        state: State,
        now: datetime,
        channel: str = "",
        origin_data: dict[str, Any] | None = None,
        rejected: Sequence[tuple[int, str, str]] = (),
        rejected_count: int = 0,
        devices: Iterable[tuple[str, str | None, int | None]] = (),
        chunks: Sequence[int] = (),
        chunk_size: int = 10_000,
        retry_of: int | None = None,
        expires_at: datetime | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
        upload_id: int | None = None,
        rule: Rule | None = None,
        justification: str | None = None,
        decided_by: str | None = None,
        audit: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> int:
        """Insert a request with its devices ``(name, nickname, line)``, chunks and rejected lines."""
        stamp = format_time(now)
        with self._write() as db:
            request_id = db["requests"].insert(
                {
                    "product_key": product_key,
                    "requester": requester,
                    "origin": str(origin),
                    "channel": channel,
                    "origin_data": json.dumps(origin_data or {}, ensure_ascii=False),
                    "kind": str(kind),
                    "count": count,
                    "rejected_count": rejected_count or len(rejected),
                    "state": str(state),
                    "retry_of": retry_of,
                    "rule": json.dumps(rule.as_dict()) if rule else None,
                    "justification": justification,
                    "decided_by": decided_by,
                    "decided_at": stamp if decided_by else None,
                    "expires_at": format_time(expires_at) if expires_at else None,
                    "phase_started_at": stamp,
                    "created_at": stamp,
                    "updated_at": stamp,
                    # Due at once, in the same transaction: any replica's sweep starts it.
                    "next_step_at": None if state.final else stamp,
                }
            ).last_pk
            db.conn.executemany(
                "INSERT INTO devices (request_id, name, nickname, chunk_no, line, outcome) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    (request_id, name, nickname, index // chunk_size, line, PENDING)
                    for index, (name, nickname, line) in enumerate(devices)
                ),
            )
            db.conn.executemany(
                "INSERT INTO chunks (request_id, chunk_no, size) VALUES (?, ?, ?)",
                ((request_id, n, size) for n, size in enumerate(chunks)),
            )
            db.conn.executemany(
                "INSERT INTO rejected_lines (request_id, line, value, reason, nickname) VALUES (?, ?, ?, ?, ?)",
                ((request_id, *row[:3], row[3] if len(row) > 3 else None) for row in rejected),
            )
            if retry_of is not None:
                # Compare-and-set in the same transaction: however many clicks, one retry request.
                taken = db.conn.execute(
                    "UPDATE requests SET retried_as = ? WHERE id = ? AND retried_as IS NULL", [request_id, retry_of]
                )
                if taken.rowcount != 1:
                    row = db.conn.execute("SELECT retried_as FROM requests WHERE id = ?", [retry_of]).fetchone()
                    raise AlreadyRetried(retry_of, row[0] if row else None)
            detail: dict[str, Any] = {"product_key": product_key, "count": count}
            if rule is not None:
                detail["rule"] = rule.source
            if justification:
                detail["reason"] = justification
            self._audit(request_id, requester, "requested", detail, stamp)
            for audit_event, audit_detail in audit:
                self._audit(request_id, decided_by or requester, audit_event, audit_detail, stamp)
            if event:
                self._enqueue(request_id, event[0], event[1], stamp)
            if upload_id is not None:
                # In the same transaction: an upload read again after a crash cannot make a second request.
                done = db.conn.execute("UPDATE uploads SET done_at = ?, request_id = ? WHERE id = ? AND done_at IS NULL", [stamp, request_id, upload_id])
                if done.rowcount != 1:
                    raise AlreadyRead(upload_id)  # rolls the request back
        log_transition(int(request_id), product_key, state, "requested", count, rejected_count or len(rejected), requester)
        return int(request_id)

    def get(self, request_id: int) -> Request | None:
        rows = self._select("SELECT * FROM requests WHERE id = ?", [request_id])
        return _request(rows[0]) if rows else None

    def requests(
        self,
        *,
        states: Iterable[State] | None = None,
        channel: str | None = None,
        origins: Iterable[Origin] | None = None,
        limit: int | None = 20,
        requester: str | None = None,
    ) -> list[Request]:
        """Newest first (``limit`` of them, or all with ``None``), optionally only in some states,
        from one channel, or from some origins."""
        where, args = [], []
        if origins is not None:
            marks, values = _in(origins)
            where.append(f"origin IN {marks}")
            args.extend(values)
        if states is not None:
            marks, values = _in(states)
            where.append(f"state IN {marks}")
            args.extend(values)
        if channel is not None:
            where.append("channel = ?")
            args.append(channel)
        if requester is not None:
            where.append("requester = ?")
            args.append(requester)
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._select(f"SELECT * FROM requests {condition} ORDER BY id DESC LIMIT ?", [*args, -1 if limit is None else limit])
        return [_request(r) for r in rows]

    def state_counts(self) -> dict[State, int]:
        rows = self.db.conn.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall()
        return {State(state): count for state, count in rows}

    def transition(
        self,
        request_id: int,
        *,
        from_states: Iterable[State],
        to_state: State,
        actor: str,
        event: str,
        now: datetime,
        detail: dict[str, Any] | None = None,
        notify: tuple[str, dict[str, Any]] | None = None,
        **fields: Any,
    ) -> bool:
        """Compare-and-set the state; with it, the audit row, the outbox event and ``fields``.

        Returns ``False``, and changes nothing, when the request is not in one of ``from_states``.
        """
        marks, expected = _in(from_states)
        stamp = format_time(now)
        values = _stored(fields)
        values.update(state=str(to_state), updated_at=stamp)
        wake, at = (_WAKE_NOW, [stamp, stamp]) if to_state == State.APPROVED else ("", [])
        with self._write() as db:
            cursor = db.conn.execute(
                f"UPDATE requests SET {_assignments(values)}{wake} WHERE id = ? AND state IN {marks}",
                [*values.values(), *at, request_id, *expected],
            )
            if cursor.rowcount != 1:
                return False
            self._audit(request_id, actor, event, detail or {}, stamp)
            if notify:
                self._enqueue(request_id, notify[0], notify[1], stamp)
            product, count, rejected = db.conn.execute(
                "SELECT product_key, count, rejected_count FROM requests WHERE id = ?", [request_id]
            ).fetchone()
        log_transition(request_id, product, to_state, event, count or 0, rejected or 0, actor)
        return True

    def add_approval(self, request_id: int, *, approver: str, now: datetime, needed: int, reason: str | None = None) -> Tally:
        """Count one approval; the one that completes the quorum approves the request.

        In one transaction: the request must wait for approval; the approval is inserted (an
        approver already counted changes nothing); and when the count reaches ``needed``, the
        state is compared-and-set to approved with its audit row and its event.
        """
        stamp = format_time(now)
        with self._write() as db:
            row = db.conn.execute("SELECT state FROM requests WHERE id = ?", [request_id]).fetchone()
            if row is None or row[0] != State.AWAITING_APPROVAL:
                return Tally.CLOSED
            inserted = db.conn.execute(
                "INSERT INTO approvals (request_id, approver, at, reason) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (request_id, approver) DO NOTHING",
                [request_id, approver, stamp, reason or None],
            )
            if inserted.rowcount != 1:
                return Tally.ALREADY_COUNTED
            approvers = [r[0] for r in db.conn.execute("SELECT approver FROM approvals WHERE request_id = ? ORDER BY at, approver", [request_id])]
            self._audit(request_id, approver, "approval", {"reason": reason or "", "count": len(approvers), "needed": needed}, stamp)
            if len(approvers) < needed:
                self._enqueue(request_id, "approval", {"by": approver, "count": len(approvers), "needed": needed}, stamp)
                return Tally.COUNTED
            cursor = db.conn.execute(
                f"UPDATE requests SET state = ?, decided_by = ?, decided_at = ?, updated_at = ?{_WAKE_NOW} WHERE id = ? AND state = ?",
                [str(State.APPROVED), approver, stamp, stamp, stamp, stamp, request_id, str(State.AWAITING_APPROVAL)],
            )
            if cursor.rowcount != 1:  # cannot happen under the write lock; kept as the compare-and-set
                raise RuntimeError(f"request #{request_id} changed state while its approval was counted")
            self._audit(request_id, approver, "approved", {"approvers": approvers, "needed": needed}, stamp)
            self._enqueue(request_id, "approved", {"by": approver, "approvers": approvers}, stamp)
            product, count, rejected = db.conn.execute(
                "SELECT product_key, count, rejected_count FROM requests WHERE id = ?", [request_id]
            ).fetchone()
        log_transition(request_id, product, State.APPROVED, "approved", count or 0, rejected or 0, approver)
        return Tally.QUORUM

    def approvals(self, request_id: int) -> list[Approval]:
        rows = self.db.execute(
            "SELECT approver, at, reason FROM approvals WHERE request_id = ? ORDER BY at, approver", [request_id]
        ).fetchall()
        return [Approval(r[0], parse_time(r[1]), r[2]) for r in rows]  # type: ignore[arg-type]

    def add_reminder(self, request_id: int, *, sent: int, now: datetime, payload: dict[str, Any]) -> bool:
        """Record reminder number ``sent`` and its event, once: ``False`` if it was sent already or
        the request no longer waits for approval."""
        stamp = format_time(now)
        with self._write() as db:
            cursor = db.conn.execute(
                "UPDATE requests SET reminders_sent = ? WHERE id = ? AND state = ? AND reminders_sent = ?",
                [sent, request_id, str(State.AWAITING_APPROVAL), sent - 1],
            )
            if cursor.rowcount != 1:
                return False
            self._audit(request_id, SYSTEM, "reminded", payload, stamp)
            self._enqueue(request_id, "reminder", payload, stamp)
        return True

    def update_request(self, request_id: int, **fields: Any) -> None:
        """Book-keeping that is not a state change (poll counters, error counts)."""
        self._update("requests", "id = ?", [request_id], fields)

    def update_origin_data(self, request_id: int, **values: Any) -> None:
        with self._write() as db:
            row = db.conn.execute("SELECT origin_data FROM requests WHERE id = ?", [request_id]).fetchone()
            if row is None:
                return
            data = json.loads(row[0] or "{}")
            data.update(values)
            data = {k: v for k, v in data.items() if v is not None}
            db.conn.execute("UPDATE requests SET origin_data = ? WHERE id = ?", [json.dumps(data, ensure_ascii=False), request_id])

    # -- chunks and devices -------------------------------------------------------------------

    def chunks(self, request_id: int) -> list[Chunk]:
        return [_chunk(r) for r in self._select("SELECT * FROM chunks WHERE request_id = ? ORDER BY chunk_no", [request_id])]

    def update_chunk(self, request_id: int, chunk_no: int, **fields: Any) -> None:
        self._update("chunks", "request_id = ? AND chunk_no = ?", [request_id, chunk_no], fields)

    def claim_register(
        self, request_id: int, chunk_no: int, owner: str, now: datetime, *, replacing: datetime | None = None
    ) -> bool:
        """Claim a chunk's register call before sending it; ``False`` if another claim got there first.

        With ``replacing``, take over a claim whose ``register_sent_at`` is that time (a crashed
        process's, or one's own after an answer that settled nothing), and only that one.
        """
        condition = "register_sent_at IS NULL" if replacing is None else "register_sent_at = ?"
        args: list[Any] = [format_time(now), owner, request_id, chunk_no]
        if replacing is not None:
            args.append(format_time(replacing))
        condition += " AND EXISTS (SELECT 1 FROM leases WHERE name = 'request:' || chunks.request_id AND owner = ? AND until > ?)"
        args += [owner, format_time(now)]
        with self._write() as db:
            cursor = db.conn.execute(
                f"UPDATE chunks SET register_sent_at = ?, claimed_by = ? WHERE request_id = ? AND chunk_no = ? AND {condition}",
                args,
            )
            return cursor.rowcount == 1

    def release_register(self, request_id: int, chunk_no: int, owner: str) -> None:
        """Give up a claim whose call certainly did not reach the platform."""
        with self._write() as db:
            db.conn.execute(
                "UPDATE chunks SET register_sent_at = NULL, claimed_by = NULL WHERE request_id = ? AND chunk_no = ? AND claimed_by = ?",
                [request_id, chunk_no, owner],
            )

    def chunk_for_apply_id(self, apply_id: int) -> Chunk | None:
        rows = self._select("SELECT * FROM chunks WHERE apply_id = ?", [apply_id])
        return _chunk(rows[0]) if rows else None

    def device_names(self, request_id: int, chunk_no: int | None = None) -> list[tuple[str, str | None]]:
        """``(name, nickname)`` in the order they were given."""
        sql = "SELECT name, nickname FROM devices WHERE request_id = ?"
        args: list[Any] = [request_id]
        if chunk_no is not None:
            sql += " AND chunk_no = ?"
            args.append(chunk_no)
        return [(r[0], r[1]) for r in self.db.execute(sql + " ORDER BY rowid", args).fetchall()]

    def devices(self, request_id: int, *, outcome: Outcome | None = None, limit: int | None = None) -> list[DeviceRow]:
        sql = "SELECT name, nickname, chunk_no, line, outcome, reason, iot_id FROM devices WHERE request_id = ?"
        args: list[Any] = [request_id]
        if outcome is not None:
            sql += " AND outcome = ?"
            args.append(str(outcome))
        sql += " ORDER BY rowid"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [DeviceRow(n, nick, c, line, Outcome(o), reason, iot) for n, nick, c, line, o, reason, iot in self.db.execute(sql, args).fetchall()]

    def outcome_counts(self, request_id: int) -> dict[Outcome, int]:
        rows = self.db.execute("SELECT outcome, COUNT(*) FROM devices WHERE request_id = ? GROUP BY outcome", [request_id])
        return {Outcome(outcome): count for outcome, count in rows.fetchall()}

    def add_devices(self, request_id: int, chunk_no: int, rows: Iterable[tuple[str, Outcome, str]]) -> None:
        """Devices named by the platform (``BatchRegisterDevice``): ``(name, outcome, iot_id)``."""
        with self._write() as db:
            db.conn.executemany(
                "INSERT OR IGNORE INTO devices (request_id, name, chunk_no, outcome, iot_id) VALUES (?, ?, ?, ?, ?)",
                ((request_id, name, chunk_no, str(outcome), iot_id) for name, outcome, iot_id in rows),
            )

    def set_outcomes(self, request_id: int, rows: Iterable[tuple[str, Outcome, str | None, str | None]]) -> None:
        """Record ``(name, outcome, reason, iot_id)`` for devices of a request."""
        with self._write() as db:
            db.conn.executemany(
                "UPDATE devices SET outcome = ?, reason = ?, iot_id = COALESCE(?, iot_id) WHERE request_id = ? AND name = ?",
                ((str(outcome), reason, iot_id, request_id, name) for name, outcome, reason, iot_id in rows),
            )

    def set_reasons(self, request_id: int, outcome: Outcome, reason: str) -> None:
        """Give every device of ``outcome`` that has no reason yet this one."""
        with self._write() as db:
            db.conn.execute(
                "UPDATE devices SET reason = ? WHERE request_id = ? AND outcome = ? AND reason IS NULL",
                [reason, request_id, str(outcome)],
            )

    def rejected_lines(self, request_id: int) -> list[RejectedLine]:
        rows = self.db.execute(
            "SELECT line, value, reason, nickname FROM rejected_lines WHERE request_id = ? ORDER BY line", [request_id]
        )
        return [RejectedLine(*r) for r in rows.fetchall()]

    # -- uploads ------------------------------------------------------------------------------

    def add_upload(
        self, *, user: str, channel: str, product_key: str, pasted: str, origin_data: dict[str, Any], now: datetime
    ) -> int:
        with self._write() as db:
            cursor = db.conn.execute(
                "INSERT INTO uploads (user, channel, product_key, origin_data, pasted, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [user, channel, product_key, json.dumps(origin_data, ensure_ascii=False), pasted, format_time(now)],
            )
            return int(cursor.lastrowid)

    def finish_upload(self, upload_id: int, now: datetime) -> None:
        """An upload that made no request (its list was refused, and the uploader told)."""
        with self._write() as db:
            db.conn.execute("UPDATE uploads SET done_at = ? WHERE id = ? AND done_at IS NULL", [format_time(now), upload_id])

    def upload(self, upload_id: int) -> Upload | None:
        found = [u for u in self._uploads("id = ? AND done_at IS NULL", [upload_id])]
        return found[0] if found else None

    def unread_uploads(self) -> list[Upload]:
        return self._uploads("done_at IS NULL", [])

    def _uploads(self, where: str, args: list[Any]) -> list[Upload]:
        rows = self.db.execute(
            f"SELECT id, user, channel, product_key, pasted, origin_data FROM uploads WHERE {where} ORDER BY id", args
        ).fetchall()
        return [Upload(r[0], r[1], r[2], r[3], r[4] or "", json.loads(r[5] or "{}")) for r in rows]

    # -- audit --------------------------------------------------------------------------------

    def audit(self, request_id: int | None = None, *, limit: int = 500) -> list[AuditEntry]:
        """The audit trail, oldest first (of one request, or of all)."""
        if request_id is None:
            rows = self._select("SELECT * FROM audit ORDER BY id LIMIT ?", [limit])
        else:
            rows = self._select("SELECT * FROM audit WHERE request_id = ? ORDER BY id LIMIT ?", [request_id, limit])
        return [
            AuditEntry(r["request_id"], parse_time(r["at"]), r["actor"], r["event"], json.loads(r["detail"] or "{}"))  # type: ignore[arg-type]
            for r in rows
        ]

    def record(self, request_id: int, actor: str, event: str, now: datetime, detail: dict[str, Any] | None = None) -> None:
        """An audit row that goes with no state change (a denied click, an API error)."""
        with self._write():
            self._audit(request_id, actor, event, detail or {}, format_time(now))

    def _audit(self, request_id: int, actor: str, event: str, detail: dict[str, Any], stamp: str) -> None:
        self.db.conn.execute(
            "INSERT INTO audit (request_id, at, actor, event, detail) VALUES (?, ?, ?, ?, ?)",
            [request_id, stamp, actor, event, json.dumps(detail, ensure_ascii=False, default=str)],
        )

    # -- outbox -------------------------------------------------------------------------------

    def enqueue(self, request_id: int, kind: str, payload: dict[str, Any], now: datetime) -> None:
        with self._write():
            self._enqueue(request_id, kind, payload, format_time(now))

    def _enqueue(self, request_id: int, kind: str, payload: dict[str, Any], stamp: str) -> None:
        self.db.conn.execute(
            "INSERT INTO outbox (request_id, kind, payload, created_at, next_at) VALUES (?, ?, ?, ?, ?)",
            [request_id, kind, json.dumps(payload, ensure_ascii=False, default=str), stamp, stamp],
        )

    def pending_events(self, origins: Iterable[Origin] | None = None) -> Iterator[Event]:
        """Every undelivered event (of requests from ``origins``, if given), oldest first."""
        sql = "SELECT o.id, o.request_id, o.kind, o.payload, o.attempts, o.next_at FROM outbox AS o"
        args: list[Any] = []
        if origins is not None:
            marks, values = _in(origins)
            sql += f" JOIN requests AS r ON r.id = o.request_id AND r.origin IN {marks}"
            args.extend(values)
        rows = self.db.execute(sql + " WHERE o.delivered_at IS NULL ORDER BY o.id", args).fetchall()
        for r in rows:
            yield Event(r[0], r[1], EventKind(r[2]), json.loads(r[3]), r[4], parse_time(r[5]))

    def pending_count(self, origins: Iterable[Origin] | None = None) -> int:
        sql = "SELECT COUNT(*) FROM outbox AS o"
        args: list[Any] = []
        if origins is not None:
            marks, values = _in(origins)
            sql += f" JOIN requests AS r ON r.id = o.request_id AND r.origin IN {marks}"
            args.extend(values)
        return int(self.db.execute(sql + " WHERE o.delivered_at IS NULL", args).fetchone()[0])

    def next_event_time(self, origins: Iterable[Origin] | None = None) -> datetime | None:
        """When the next event can go: the earliest among the first undelivered event of each request."""
        sql = (
            "SELECT MIN(o.next_at) FROM outbox AS o JOIN requests AS r ON r.id = o.request_id"
            " WHERE o.delivered_at IS NULL AND o.id ="
            " (SELECT MIN(id) FROM outbox WHERE request_id = o.request_id AND delivered_at IS NULL)"
        )
        args: list[Any] = []
        if origins is not None:
            marks, values = _in(origins)
            sql += f" AND r.origin IN {marks}"
            args.extend(values)
        row = self.db.execute(sql, args).fetchone()
        return parse_time(row[0]) if row and row[0] else None

    def mark_delivered(self, event_id: int, now: datetime) -> None:
        with self._write() as db:
            db.conn.execute("UPDATE outbox SET delivered_at = ? WHERE id = ?", [format_time(now), event_id])

    def mark_failed(self, event_id: int, error: str, next_at: datetime) -> None:
        with self._write() as db:
            db.conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_at = ? WHERE id = ?",
                [error[:500], format_time(next_at), event_id],
            )

    def step_done(self, event_id: int, step: str) -> bool:
        row = self.db.execute("SELECT 1 FROM notified_steps WHERE event_id = ? AND step = ?", [event_id, step]).fetchone()
        return row is not None

    def mark_step(self, event_id: int, step: str) -> None:
        with self._write() as db:
            db.conn.execute("INSERT OR IGNORE INTO notified_steps (event_id, step) VALUES (?, ?)", [event_id, step])

    def begin_step(self, event_id: int, step: str, now: datetime) -> datetime | None:
        with self._write() as db:
            row = db.execute("SELECT begun_at FROM begun_steps WHERE event_id = ? AND step = ?", [event_id, step]).fetchone()
            if row is not None:
                return datetime.fromisoformat(row[0])
            db.conn.execute("INSERT INTO begun_steps (event_id, step, begun_at) VALUES (?, ?, ?)", [event_id, step, format_time(now)])
        return None

    # -- figures for monitoring -----------------------------------------------------------------

    def figures(self) -> Figures:
        created = self.db.execute("SELECT COUNT(*) FROM devices WHERE outcome = ?", [Outcome.CREATED.value]).fetchone()[0]
        return Figures(requests_by_state=self.state_counts(), outbox_pending=self.pending_count(), devices_created=created)

    def delivered_events(self, request_id: int) -> list[Event]:
        rows = self.db.execute(
            "SELECT id, request_id, kind, payload, attempts FROM outbox WHERE request_id = ? AND delivered_at IS NOT NULL ORDER BY id",
            [request_id],
        ).fetchall()
        return [Event(r[0], r[1], EventKind(r[2]), json.loads(r[3]), r[4]) for r in rows]

    def next_event(self, request_id: int) -> Event | None:
        rows = self.db.execute(
            "SELECT id, request_id, kind, payload, attempts, next_at FROM outbox"
            " WHERE request_id = ? AND delivered_at IS NULL ORDER BY id LIMIT 1",
            [request_id],
        ).fetchall()
        return Event(rows[0][0], rows[0][1], EventKind(rows[0][2]), json.loads(rows[0][3]), rows[0][4], parse_time(rows[0][5])) if rows else None

    # -- leases and due steps -----------------------------------------------------------------

    def take_lease(self, name: str, owner: str, now: datetime, until: datetime) -> bool:
        with self._write() as db:
            cursor = db.conn.execute(
                "INSERT INTO leases (name, owner, until) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
                " SET owner = excluded.owner, until = excluded.until WHERE leases.owner = excluded.owner OR leases.until <= ?",
                [name, owner, format_time(until), format_time(now)],
            )
            return cursor.rowcount == 1

    def renew_leases(self, owner: str, until: datetime) -> set[str]:
        with self._write() as db:
            names = {r[0] for r in db.conn.execute("SELECT name FROM leases WHERE owner = ?", [owner])}
            db.conn.execute("UPDATE leases SET until = ? WHERE owner = ?", [format_time(until), owner])
        return names

    def release_lease(self, name: str, owner: str) -> None:
        with self._write() as db:
            db.conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", [name, owner])

    def release_leases(self, owner: str) -> int:
        with self._write() as db:
            return db.conn.execute("DELETE FROM leases WHERE owner = ?", [owner]).rowcount

    def leases(self) -> list[Lease]:
        rows = self.db.execute("SELECT name, owner, until FROM leases ORDER BY name").fetchall()
        return [Lease(r[0], r[1], datetime.fromisoformat(r[2])) for r in rows]

    def wake_request(self, request_id: int, at: datetime) -> None:
        with self._write() as db:
            db.conn.execute(
                "UPDATE requests SET next_step_at = CASE WHEN next_step_at IS NULL OR next_step_at > ?1 THEN ?1 ELSE next_step_at END,"
                " wakes = wakes + 1 WHERE id = ?2",
                [format_time(at), request_id],
            )

    def begin_request_step(self, request_id: int, now: datetime, fallback: datetime) -> StepTurn:
        with self._write() as db:
            row = db.conn.execute("SELECT next_step_at, wakes FROM requests WHERE id = ?", [request_id]).fetchone()
            if row is None:
                return StepTurn(True, None, 0)
            due_at = parse_time(row[0])
            if due_at is not None and due_at > now:
                return StepTurn(False, due_at, row[1])
            db.conn.execute("UPDATE requests SET next_step_at = ? WHERE id = ?", [format_time(fallback), request_id])
            return StepTurn(True, due_at, row[1])

    def end_request_step(self, request_id: int, turn: StepTurn, at: datetime | None) -> datetime | None:
        with self._write() as db:
            row = db.conn.execute("SELECT next_step_at, wakes FROM requests WHERE id = ?", [request_id]).fetchone()
            if row is None:
                return None
            due = _next_due(parse_time(row[0]), row[1], turn, at)
            db.conn.execute("UPDATE requests SET next_step_at = ? WHERE id = ?", [due, request_id])
        return parse_time(due) if due is not None else None

    def due_requests(self, now: datetime, *, origins: Iterable[Origin] | None = None, limit: int = 100) -> list[int]:
        sql = (
            "SELECT r.id FROM requests AS r WHERE r.next_step_at <= ?"
            " AND NOT EXISTS (SELECT 1 FROM leases AS l WHERE l.name = 'request:' || r.id AND l.until > ?)"
        )
        args: list[Any] = [format_time(now), format_time(now)]
        if origins is not None:
            marks, values = _in(origins)
            sql += f" AND r.origin IN {marks}"
            args.extend(values)
        return [r[0] for r in self.db.execute(sql + " ORDER BY r.next_step_at LIMIT ?", [*args, limit]).fetchall()]

    # -- IotIds read after the result -----------------------------------------------------------

    def set_iot_ids(self, request_id: int, chunk_no: int, rows: Iterable[tuple[str, str]], now: datetime) -> int:
        """Give created devices their IotIds and mark the chunk's IotIds read, in one transaction."""
        with self._write() as db:
            cursor = db.conn.executemany(
                "UPDATE devices SET iot_id = ? WHERE request_id = ? AND name = ? AND outcome = ?",
                ((iot_id, request_id, name, Outcome.CREATED.value) for name, iot_id in rows),
            )
            db.conn.execute(
                "UPDATE chunks SET iot_ids_read_at = ? WHERE request_id = ? AND chunk_no = ?", [format_time(now), request_id, chunk_no]
            )
            return cursor.rowcount

    def unread_iot_ids(self, origins: Iterable[Origin] | None = None) -> list[int]:
        states, state_values = _in(s for s in State if s.final)
        statuses, status_values = _in(CREATION_ENDED)
        sql = (
            "SELECT DISTINCT r.id FROM chunks AS c JOIN requests AS r ON r.id = c.request_id"
            f" WHERE c.iot_ids_read_at IS NULL AND c.status IN {statuses} AND r.state IN {states}"
        )
        args = [*status_values, *state_values]
        if origins is not None:
            marks, values = _in(origins)
            sql += f" AND r.origin IN {marks}"
            args.extend(values)
        return [r[0] for r in self.db.execute(sql + " ORDER BY r.id", args).fetchall()]

    # -- the IoT Platform quotas (one process serves a SQLite file: its clock is the database's) ---

    def quotas(self) -> dict[str, float]:
        return dict(self.db.execute("SELECT action, qps FROM quotas ORDER BY action").fetchall())

    def set_quotas(self, quotas: Mapping[str, float], *, replace: bool = True) -> dict[str, tuple[float | None, float]]:
        for action, qps in quotas.items():
            if not qps > 0:
                raise ValueError(f"the quota for {action} must be above 0, not {qps}")
        changed: dict[str, tuple[float | None, float]] = {}
        stamp = format_time(datetime.now(timezone.utc))
        with self._write() as db:
            for action, qps in sorted(quotas.items()):
                row = db.execute("SELECT qps FROM quotas WHERE action = ?", [action]).fetchone()
                if row is None:
                    db.execute("INSERT INTO quotas (action, qps, granted, changed_at) VALUES (?, ?, '[]', ?)", [action, qps, stamp])
                    changed[action] = (None, qps)
                elif replace and row[0] != qps:
                    db.execute("UPDATE quotas SET qps = ?, changed_at = ? WHERE action = ?", [qps, stamp, action])
                    changed[action] = (row[0], qps)
        return changed

    def book_slot(self, action: str, margin: float, retake: int | None = None, spacing: float = 0.0) -> Slot | None:
        """The slot computed in this process, under the write lock, on the wall clock."""
        with self._write() as db:
            qps, schedule = self._schedule(db, action)
            if schedule is None:
                return None
            now = time.time()
            booked = schedule.book(now, qps, margin, spacing, retake)
            self._keep_schedule(db, action, schedule)
        return Slot(booked.start - now, booked.start, qps, booked.moved, booked.ticket)

    def slot_went(self, action: str, ticket: int, at: float, margin: float) -> None:
        with self._write() as db:
            qps, schedule = self._schedule(db, action)
            if schedule is not None and schedule.went(ticket, at, qps, margin):
                self._keep_schedule(db, action, schedule)

    def slot_of(self, action: str, ticket: int) -> Slot | None:
        qps, schedule = self._schedule(self.db, action)
        start = None if schedule is None else schedule.slot_of(ticket)
        return None if start is None else Slot(start - time.time(), start, qps, False, ticket)

    @staticmethod
    def _schedule(db: Database, action: str) -> tuple[float, Schedule | None]:
        row = db.execute("SELECT qps, granted, last_ticket, lanes, lane_last, spaced FROM quotas WHERE action = ?", [action]).fetchone()
        if row is None:
            return 0.0, None
        return row[0], Schedule(json.loads(row[1]), row[2], json.loads(row[3]), json.loads(row[4]), FREE if row[5] is None else row[5])

    @staticmethod
    def _keep_schedule(db: Database, action: str, schedule: Schedule) -> None:
        db.execute(
            "UPDATE quotas SET granted = ?, last_ticket = ?, lanes = ?, lane_last = ?, spaced = ? WHERE action = ?",
            [json.dumps(schedule.starts), schedule.last, json.dumps(schedule.lanes), json.dumps(schedule.lane_last),
             None if schedule.spaced == FREE else schedule.spaced, action],
        )


#: With an approval, in its transaction: the next step is due at once (the two parameters: the
#: approval's time), so that no failure between the two can leave an approved request waiting.
_WAKE_NOW = ", next_step_at = CASE WHEN next_step_at IS NULL OR next_step_at > ? THEN ? ELSE next_step_at END, wakes = wakes + 1"


def _next_due(current: datetime | None, wakes: int, turn: StepTurn, at: datetime | None) -> str | None:
    """The due time a step leaves: its own, unless the request was woken while it ran (then the earlier)."""
    if wakes != turn.wakes and current is not None:
        at = current if at is None else min(at, current)
    return format_time(at) if at is not None else None
