"""Moving a deployment from SQLite to PostgreSQL (``iotreg db copy --to URL``).

Everything is copied with its history: requests with their ids (and the rule each is decided
under), chunks (ApplyIds, register claims), devices in their order, rejected lines, approvals, the
audit trail, the outbox (delivered or not, with the
steps of a delivery already done) and uploads. The SQLite tables are read directly (this is a
migration tool, not a user of the store); the target is a :class:`PostgresStore`, migrated to the
current schema when opened and written with ``COPY`` in one transaction, then its serials are moved
past the copied ids so the next request gets a new one. The copy is checked by counting the rows of
every table on both sides.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

from bot.store import StoreBusy
from bot.store.postgres import SERIALS, TABLES, PostgresStore
from bot.store.sqlite import SqliteStore

#: What to read from SQLite for each target table: the target's columns and the SQLite query giving
#: them in that order (times and JSON as text: PostgreSQL parses both on the way in).
SOURCES: dict[str, tuple[str, str]] = {
    "requests": (
        "id, product_key, requester, origin, channel, kind, count, rejected_count, state, reason, decided_by,"
        " decided_at, expires_at, retry_of, polls, phase_started_at, errors_in_row, created_at, updated_at, origin_data,"
        " rule, justification, retried_as, reminders_sent",
        "SELECT id, product_key, requester, origin, COALESCE(channel, ''), kind, COALESCE(count, 0),"
        " COALESCE(rejected_count, 0), state, reason, decided_by, decided_at, expires_at, retry_of, COALESCE(polls, 0),"
        " phase_started_at, COALESCE(errors_in_row, 0), created_at, updated_at, COALESCE(origin_data, '{}'),"
        " rule, justification, retried_as, COALESCE(reminders_sent, 0) FROM requests ORDER BY id",
    ),
    "chunks": (
        "request_id, chunk_no, size, apply_id, status, register_sent_at, register_confirmed_at, error, claimed_by, iot_ids_read_at",
        "SELECT request_id, chunk_no, size, apply_id, status, register_sent_at, register_confirmed_at, error, claimed_by, iot_ids_read_at"
        " FROM chunks ORDER BY request_id, chunk_no",
    ),
    "devices": (
        "request_id, name, nickname, chunk_no, line, outcome, reason, iot_id",
        "SELECT request_id, name, nickname, chunk_no, line, COALESCE(outcome, 'pending'), reason, iot_id"
        " FROM devices ORDER BY rowid",  # the order the devices were given in
    ),
    "rejected_lines": ("request_id, line, value, reason, nickname", "SELECT request_id, line, value, reason, nickname FROM rejected_lines ORDER BY rowid"),
    "approvals": ("request_id, approver, at, reason", "SELECT request_id, approver, at, reason FROM approvals ORDER BY rowid"),
    "audit": (
        "id, request_id, at, actor, event, detail",
        "SELECT id, request_id, at, actor, event, COALESCE(detail, '{}') FROM audit ORDER BY id",
    ),
    "outbox": (
        "id, request_id, kind, payload, created_at, attempts, next_at, delivered_at, last_error",
        "SELECT id, request_id, kind, COALESCE(payload, '{}'), created_at, COALESCE(attempts, 0), next_at, delivered_at,"
        " last_error FROM outbox ORDER BY id",
    ),
    "notified_steps": ("event_id, step", "SELECT event_id, step FROM notified_steps ORDER BY event_id, step"),
    "begun_steps": ("event_id, step, begun_at", "SELECT event_id, step, begun_at FROM begun_steps ORDER BY event_id, step"),
    "uploads": (
        "id, uploader, channel, product_key, pasted, origin_data, created_at, done_at, request_id",
        "SELECT id, user, COALESCE(channel, ''), COALESCE(product_key, ''), COALESCE(pasted, ''),"
        " COALESCE(origin_data, '{}'), created_at, done_at, request_id FROM uploads ORDER BY id",
    ),
}
assert tuple(SOURCES) == TABLES


class CopyError(Exception):
    """The copy cannot be made (no source, a target that is not empty) or did not add up. One line."""


@dataclasses.dataclass(frozen=True)
class Copied:
    """Rows of one table in the source and in the target after the copy."""

    table: str
    source: int
    target: int


def copy_sqlite_to_postgres(source: str | Path, target_url: str) -> list[Copied]:
    """Copy the SQLite deployment at ``source`` into the empty PostgreSQL database at ``target_url``.

    Raises :class:`CopyError` (and writes nothing) when the source is missing or the target holds
    data; :class:`~bot.store.StoreUnavailable` when either cannot be opened.
    """
    source = Path(source)
    if not source.is_file():
        raise CopyError(f"there is no SQLite database at {source}: give the deployment's file with --from PATH")
    # Opening it brings an older deployment's schema up to date, as iotreg does at start. Holding it
    # as `serve` does refuses a copy while the bot runs on it, and the bot's start while it is copied.
    holder = SqliteStore(source)
    try:
        holder.hold("serve")
    except StoreBusy:
        holder.close()
        raise CopyError(f"iotreg serve is running on {source}: stop it, then copy (what it writes meanwhile would be lost)") from None
    try:
        copied = _copy(source, target_url)
    finally:
        holder.close()
    wrong = [c for c in copied if c.source != c.target]
    if wrong:
        raise CopyError("the copy does not add up: " + ", ".join(f"{c.table} {c.source:,} in SQLite, {c.target:,} copied" for c in wrong))
    return copied


def _copy(source: Path, target_url: str) -> list[Copied]:
    target = PostgresStore(target_url)
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        held = {table: n for table, n in _counts(target).items() if n}
        if held:
            what = ", ".join(f"{n:,} {table}" for table, n in held.items())
            raise CopyError(f"{target.location} is not empty ({what}): copy into a new, empty database")
        with target.connection() as conn, conn.cursor() as cur:
            for table, (columns, query) in SOURCES.items():
                with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in reader.execute(query):
                        copy.write_row(row)
            for table, column in SERIALS.items():
                # The next id handed out follows the copied ones (a request made after the copy is new).
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence(%s, %s), COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)",
                    [table, column],
                )
        copied = [Copied(table, reader.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0], n) for table, n in _counts(target).items()]
    finally:
        reader.close()
        target.close()
    return copied


def _counts(target: PostgresStore) -> dict[str, int]:
    with target.connection() as conn:
        return {table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in TABLES}
