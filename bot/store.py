"""Durable state: requests, their devices and chunks, the audit trail, and the outbox of events.

Everything the workflow knows lives here, in one SQLite file, so a restart loses nothing.

* One connection per thread (Bolt listeners, scheduler jobs and the CLI run in different threads),
  in WAL mode, so readers never block the writer and a killed process leaves a consistent file.
* State changes are compare-and-set: :meth:`Store.transition` moves a request from one of the
  expected states to the next in a single ``UPDATE … WHERE state IN (…)``; when two approvers click
  at once, exactly one of them gets ``True``.
* Each transition writes its audit row and its outbox event in the same transaction, so a crash
  can never leave a state change without its record, or a record without its change.
* The schema is built by numbered migrations (sqlite-utils ``Migrations``), applied at start;
  a database written by an older iotreg is brought up to date in place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
from contextlib import contextmanager
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlite_utils import Database, Migrations

log = logging.getLogger(__name__)

#: Request states. Final states have no work left (a failed check can still be dismissed: cancelled).
CHECKING = "checking"
CHECK_FAILED = "check_failed"
AWAITING_APPROVAL = "awaiting_approval"
APPROVED = "approved"
REGISTERING = "registering"
DONE = "done"
FAILED = "failed"
REJECTED = "rejected"
CANCELLED = "cancelled"
EXPIRED = "expired"

FINAL_STATES = frozenset({CHECK_FAILED, DONE, FAILED, REJECTED, CANCELLED, EXPIRED})
ACTIVE_STATES = frozenset({CHECKING, AWAITING_APPROVAL, APPROVED, REGISTERING})

#: Device outcomes.
PENDING = "pending"
CREATED = "created"
INVALID = "invalid"  # refused by the platform's check
NOT_CREATED = "not_created"  # checked, but creation failed

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


@dataclasses.dataclass(frozen=True)
class Upload:
    """A device list someone submitted, to be read (once) into a request."""

    id: int
    user: str
    channel: str
    product_key: str
    files: list[dict[str, Any]]
    pasted: str


@dataclasses.dataclass(frozen=True)
class Request:
    """A registration request as stored."""

    id: int
    product_key: str
    requester: str
    origin: str
    channel: str
    thread_ts: str
    kind: str
    count: int
    rejected_count: int
    state: str
    reason: str | None
    decided_by: str | None
    decided_at: datetime | None
    expires_at: datetime | None
    retry_of: int | None
    polls: int
    phase_started_at: datetime | None
    errors_in_row: int
    created_at: datetime
    updated_at: datetime
    slack_error: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Request:
        values = {f.name: row.get(f.name) for f in dataclasses.fields(cls)}
        for key in ("decided_at", "expires_at", "phase_started_at", "created_at", "updated_at"):
            values[key] = parse_time(values[key])
        for key in ("channel", "thread_ts"):
            values[key] = values[key] or ""
        for key in ("count", "rejected_count", "polls", "errors_in_row"):
            values[key] = values[key] or 0
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Up to 10,000 devices of a request that share one ApplyId."""

    request_id: int
    chunk_no: int
    size: int
    apply_id: int | None
    status: str | None
    register_sent_at: datetime | None
    register_confirmed_at: datetime | None
    error: str | None
    claimed_by: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Chunk:
        values = {f.name: row.get(f.name) for f in dataclasses.fields(cls)}
        values["register_sent_at"] = parse_time(values["register_sent_at"])
        values["register_confirmed_at"] = parse_time(values["register_confirmed_at"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class DeviceRow:
    """One device of a request and what became of it."""

    name: str
    nickname: str | None
    chunk_no: int
    line: int | None
    outcome: str
    reason: str | None
    iot_id: str | None


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    request_id: int
    at: datetime
    actor: str
    event: str
    detail: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Event:
    """A notification waiting in (or delivered from) the outbox."""

    id: int
    request_id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    next_at: datetime | None = None


@dataclasses.dataclass(frozen=True)
class Figures:
    """What :meth:`Store.figures` counts: requests by state, undelivered events, devices created."""

    requests_by_state: dict[str, int]
    outbox_pending: int
    devices_created: int


def _log_transition(request_id: int, product: str, state: str, event: str, devices: int, rejected: int, actor: str) -> None:
    """One INFO line per request created or moved, its fields also given apart (for JSON logs)."""
    fields = {"request_id": request_id, "product": product, "state": state, "event": event,
              "devices": devices, "rejected": rejected, "actor": actor}
    log.info("request #%d (%s): %s (%s), %d device(s), %d rejected, by %s", *fields.values(), extra=fields)


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


class Store:
    """The SQLite database behind the workflow. Safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        with self._write():  # two processes starting at once migrate one after the other
            migrations.apply(self.db)

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
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def schema_version(self) -> list[str]:
        return [m.name for m in migrations.applied(self.db)]

    # -- requests -----------------------------------------------------------------------------

    def create_request(
        self,
        *,
        product_key: str,
        requester: str,
        origin: str,
        kind: str,
        count: int,
        state: str,
        now: datetime,
        channel: str = "",
        thread_ts: str = "",
        rejected: Sequence[tuple[int, str, str]] = (),
        rejected_count: int = 0,
        devices: Iterable[tuple[str, str | None, int | None]] = (),
        chunks: Sequence[int] = (),
        chunk_size: int = 10_000,
        retry_of: int | None = None,
        expires_at: datetime | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
        upload_id: int | None = None,
    ) -> int:
        """Insert a request with its devices ``(name, nickname, line)``, chunks and rejected lines."""
        stamp = format_time(now)
        with self._write() as db:
            request_id = db["requests"].insert(
                {
                    "product_key": product_key,
                    "requester": requester,
                    "origin": origin,
                    "channel": channel,
                    "thread_ts": thread_ts,
                    "kind": kind,
                    "count": count,
                    "rejected_count": rejected_count or len(rejected),
                    "state": state,
                    "retry_of": retry_of,
                    "expires_at": format_time(expires_at) if expires_at else None,
                    "phase_started_at": stamp,
                    "created_at": stamp,
                    "updated_at": stamp,
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
                "INSERT INTO rejected_lines (request_id, line, value, reason) VALUES (?, ?, ?, ?)",
                ((request_id, line, value, reason) for line, value, reason in rejected),
            )
            self._audit(request_id, requester, "requested", {"product_key": product_key, "count": count}, stamp)
            if event:
                self._enqueue(request_id, event[0], event[1], stamp)
            if upload_id is not None:
                # In the same transaction: an upload read again after a crash cannot make a second request.
                db.conn.execute("UPDATE uploads SET done_at = ?, request_id = ? WHERE id = ?", [stamp, request_id, upload_id])
        _log_transition(int(request_id), product_key, state, "requested", count, rejected_count or len(rejected), requester)
        return int(request_id)

    def get(self, request_id: int) -> Request | None:
        rows = self._select("SELECT * FROM requests WHERE id = ?", [request_id])
        return Request.from_row(rows[0]) if rows else None

    def requests(
        self,
        *,
        states: Iterable[str] | None = None,
        channel: str | None = None,
        origins: Iterable[str] | None = None,
        limit: int | None = 20,
    ) -> list[Request]:
        """Newest first (``limit`` of them, or all with ``None``), optionally only in some states,
        from one channel, or from some origins."""
        where, args = [], []
        if origins is not None:
            origins = list(origins)
            where.append(f"origin IN ({', '.join('?' * len(origins))})")
            args.extend(origins)
        if states is not None:
            states = list(states)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        if channel is not None:
            where.append("channel = ?")
            args.append(channel)
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._select(f"SELECT * FROM requests {condition} ORDER BY id DESC LIMIT ?", [*args, -1 if limit is None else limit])
        return [Request.from_row(r) for r in rows]

    def transition(
        self,
        request_id: int,
        *,
        from_states: Iterable[str],
        to_state: str,
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
        from_states = list(from_states)
        stamp = format_time(now)
        values = _stored(fields)
        values.update(state=to_state, updated_at=stamp)
        with self._write() as db:
            cursor = db.conn.execute(
                f"UPDATE requests SET {_assignments(values)} WHERE id = ? AND state IN ({', '.join('?' * len(from_states))})",
                [*values.values(), request_id, *from_states],
            )
            if cursor.rowcount != 1:
                return False
            self._audit(request_id, actor, event, detail or {}, stamp)
            if notify:
                self._enqueue(request_id, notify[0], notify[1], stamp)
            product, count, rejected = db.conn.execute(
                "SELECT product_key, count, rejected_count FROM requests WHERE id = ?", [request_id]
            ).fetchone()
        _log_transition(request_id, product, to_state, event, count or 0, rejected or 0, actor)
        return True

    def update_request(self, request_id: int, **fields: Any) -> None:
        """Book-keeping that is not a state change (poll counters, the thread of a Slack message)."""
        self._update("requests", "id = ?", [request_id], fields)

    # -- chunks and devices -------------------------------------------------------------------

    def chunks(self, request_id: int) -> list[Chunk]:
        return [Chunk.from_row(r) for r in self._select("SELECT * FROM chunks WHERE request_id = ? ORDER BY chunk_no", [request_id])]

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
        return Chunk.from_row(rows[0]) if rows else None

    def device_names(self, request_id: int, chunk_no: int | None = None) -> list[tuple[str, str | None]]:
        """``(name, nickname)`` in the order they were given."""
        sql = "SELECT name, nickname FROM devices WHERE request_id = ?"
        args: list[Any] = [request_id]
        if chunk_no is not None:
            sql += " AND chunk_no = ?"
            args.append(chunk_no)
        return [(r[0], r[1]) for r in self.db.execute(sql + " ORDER BY rowid", args).fetchall()]

    def devices(self, request_id: int, *, outcome: str | None = None, limit: int | None = None) -> list[DeviceRow]:
        sql = "SELECT name, nickname, chunk_no, line, outcome, reason, iot_id FROM devices WHERE request_id = ?"
        args: list[Any] = [request_id]
        if outcome is not None:
            sql += " AND outcome = ?"
            args.append(outcome)
        sql += " ORDER BY rowid"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [DeviceRow(*r) for r in self.db.execute(sql, args).fetchall()]

    def outcome_counts(self, request_id: int) -> dict[str, int]:
        rows = self.db.execute("SELECT outcome, COUNT(*) FROM devices WHERE request_id = ? GROUP BY outcome", [request_id])
        return {outcome: count for outcome, count in rows.fetchall()}

    def add_devices(self, request_id: int, chunk_no: int, rows: Iterable[tuple[str, str, str]]) -> None:
        """Devices named by the platform (``BatchRegisterDevice``): ``(name, outcome, iot_id)``."""
        with self._write() as db:
            db.conn.executemany(
                "INSERT OR IGNORE INTO devices (request_id, name, chunk_no, outcome, iot_id) VALUES (?, ?, ?, ?, ?)",
                ((request_id, name, chunk_no, outcome, iot_id) for name, outcome, iot_id in rows),
            )

    def set_outcomes(self, request_id: int, rows: Iterable[tuple[str, str, str | None, str | None]]) -> None:
        """Record ``(name, outcome, reason, iot_id)`` for devices of a request."""
        with self._write() as db:
            db.conn.executemany(
                "UPDATE devices SET outcome = ?, reason = ?, iot_id = COALESCE(?, iot_id) WHERE request_id = ? AND name = ?",
                ((outcome, reason, iot_id, request_id, name) for name, outcome, reason, iot_id in rows),
            )

    def set_reasons(self, request_id: int, outcome: str, reason: str) -> None:
        """Give every device of ``outcome`` that has no reason yet this one."""
        with self._write() as db:
            db.conn.execute(
                "UPDATE devices SET reason = ? WHERE request_id = ? AND outcome = ? AND reason IS NULL",
                [reason, request_id, outcome],
            )

    def rejected_lines(self, request_id: int) -> list[tuple[int, str, str]]:
        rows = self.db.execute(
            "SELECT line, value, reason FROM rejected_lines WHERE request_id = ? ORDER BY line", [request_id]
        )
        return [tuple(r) for r in rows.fetchall()]

    # -- uploads ------------------------------------------------------------------------------

    def add_upload(self, *, user: str, channel: str, product_key: str, files: list[dict[str, Any]], pasted: str, now: datetime) -> int:
        with self._write() as db:
            cursor = db.conn.execute(
                "INSERT INTO uploads (user, channel, product_key, files, pasted, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [user, channel, product_key, json.dumps(files), pasted, format_time(now)],
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
            f"SELECT id, user, channel, product_key, files, pasted FROM uploads WHERE {where} ORDER BY id", args
        ).fetchall()
        return [Upload(r[0], r[1], r[2], r[3], json.loads(r[4] or "[]"), r[5] or "") for r in rows]

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

    def pending_events(self, origins: Iterable[str] | None = None) -> Iterator[Event]:
        """Every undelivered event (of requests from ``origins``, if given), oldest first."""
        sql = "SELECT o.id, o.request_id, o.kind, o.payload, o.attempts, o.next_at FROM outbox AS o"
        args: list[Any] = []
        if origins is not None:
            origins = list(origins)
            sql += f" JOIN requests AS r ON r.id = o.request_id AND r.origin IN ({', '.join('?' * len(origins))})"
            args.extend(origins)
        rows = self.db.execute(sql + " WHERE o.delivered_at IS NULL ORDER BY o.id", args).fetchall()
        for r in rows:
            yield Event(r[0], r[1], r[2], json.loads(r[3]), r[4], parse_time(r[5]))

    def next_event_time(self, origins: Iterable[str] | None = None) -> datetime | None:
        """When the next event can go: the earliest among the first undelivered event of each request."""
        sql = (
            "SELECT MIN(o.next_at) FROM outbox AS o JOIN requests AS r ON r.id = o.request_id"
            " WHERE o.delivered_at IS NULL AND o.id ="
            " (SELECT MIN(id) FROM outbox WHERE request_id = o.request_id AND delivered_at IS NULL)"
        )
        args: list[Any] = []
        if origins is not None:
            origins = list(origins)
            sql += f" AND r.origin IN ({', '.join('?' * len(origins))})"
            args.extend(origins)
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

    # -- figures for monitoring -----------------------------------------------------------------

    def figures(self) -> Figures:
        """Counts for the metrics, read from the database so that every replica reports the same."""
        by_state = dict(self.db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall())
        outbox = self.db.execute("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL").fetchone()[0]
        created = self.db.execute("SELECT COUNT(*) FROM devices WHERE outcome = ?", [CREATED]).fetchone()[0]
        return Figures(requests_by_state=by_state, outbox_pending=outbox, devices_created=created)

    def delivered_events(self, request_id: int) -> list[Event]:
        rows = self.db.execute(
            "SELECT id, request_id, kind, payload, attempts FROM outbox WHERE request_id = ? AND delivered_at IS NOT NULL ORDER BY id",
            [request_id],
        ).fetchall()
        return [Event(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]
