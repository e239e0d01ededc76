"""The server store: PostgreSQL through a psycopg connection pool (see :mod:`bot.store` for what every
store promises).

* Plain SQL. Compare-and-set is one ``UPDATE … WHERE id = %s AND state = ANY(%s)``: the row lock
  makes a second writer wait, then re-read the row and find the state already moved on, so exactly
  one of two racing approvers changes anything. Its audit row and outbox event go in the same
  transaction.
* Times are ``timestamptz`` (the session runs in UTC, so they come back as aware UTC datetimes);
  enums are stored as their text (psycopg would store an ``Enum``'s *name*, so values are passed as
  ``str``); JSON is ``jsonb``.
* Migrations are functions in :data:`MIGRATIONS`, applied at start in one transaction under an
  advisory lock (two processes starting at once migrate one after the other), and recorded by name
  in ``schema_migrations``. A new one is one more function with the ``@migration`` decorator.
* Failures of the server (unreachable at start, lost while running) become :class:`StoreUnavailable`
  with one line naming host, port and database, never the password. The pool checks a connection
  before lending it and replaces broken ones, so calls work again as soon as the server is back.
"""

from __future__ import annotations

import enum
import json
import time
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from bot.domain import (
    SYSTEM,
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
    Tally,
    Upload,
)
from bot.slots import MOVE_WITHIN
from bot.store import CREATION_ENDED, AlreadyRead, AlreadyRetried, Figures, Lease, Slot, StepTurn, StoreUnavailable, log_transition, redact_url

log = logging.getLogger(__name__)

PENDING = Outcome.PENDING.value
#: Seconds to wait for the server to accept a connection (at start, and for each new pool connection).
CONNECT_TIMEOUT = 5
#: Seconds a booking waits for the row of its quota before it gives up (another session holding it).
BOOKING_LOCK_TIMEOUT = 10
#: Any number, the same in every iotreg: the key of the advisory lock held while migrating.
MIGRATION_LOCK = 0x10_7E_6D_B0

Migration = Callable[[psycopg.Cursor[Any]], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(function: Migration) -> Migration:
    """Add ``function`` to the migrations, applied in the order they are defined, once each, by name."""
    MIGRATIONS.append((function.__name__, function))
    return function


@migration
def m001_initial(cur: psycopg.Cursor[Any]) -> None:
    cur.execute(
        """
        CREATE TABLE requests (
            id bigserial PRIMARY KEY,
            product_key text NOT NULL,
            requester text NOT NULL,
            origin text NOT NULL,
            channel text NOT NULL DEFAULT '',
            kind text NOT NULL,
            count integer NOT NULL DEFAULT 0,
            rejected_count integer NOT NULL DEFAULT 0,
            state text NOT NULL,
            reason text,
            decided_by text,
            decided_at timestamptz,
            expires_at timestamptz,
            retry_of bigint,
            polls integer NOT NULL DEFAULT 0,
            phase_started_at timestamptz,
            errors_in_row integer NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            origin_data jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX requests_state ON requests (state);
        CREATE INDEX requests_channel ON requests (channel, id);

        CREATE TABLE chunks (
            request_id bigint NOT NULL REFERENCES requests (id),
            chunk_no integer NOT NULL,
            size integer NOT NULL,
            apply_id bigint UNIQUE,
            status text,
            register_sent_at timestamptz,  -- written BEFORE the register call: see registration.py
            register_confirmed_at timestamptz,
            error text,
            claimed_by text,
            PRIMARY KEY (request_id, chunk_no)
        );

        -- seq keeps the order the devices were given in (SQLite's rowid).
        CREATE TABLE devices (
            seq bigserial NOT NULL,
            request_id bigint NOT NULL REFERENCES requests (id),
            name text NOT NULL,
            nickname text,
            chunk_no integer NOT NULL,
            line integer,
            outcome text NOT NULL DEFAULT 'pending',
            reason text,
            iot_id text,
            PRIMARY KEY (request_id, name)
        -- Room in each page: an outcome written later is a HOT update that touches no index
        -- (half the time of set_outcomes, bench/bench_store.py).
        ) WITH (fillfactor = 70);
        CREATE INDEX devices_order ON devices (request_id, chunk_no, seq);

        CREATE TABLE rejected_lines (
            request_id bigint NOT NULL REFERENCES requests (id),
            line integer,
            value text,
            reason text
        );
        CREATE INDEX rejected_lines_request ON rejected_lines (request_id, line);

        CREATE TABLE audit (
            id bigserial PRIMARY KEY,
            request_id bigint,
            at timestamptz NOT NULL,
            actor text,
            event text,
            detail jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_request ON audit (request_id, id);

        CREATE TABLE outbox (
            id bigserial PRIMARY KEY,
            request_id bigint NOT NULL,
            kind text NOT NULL,
            payload jsonb NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            next_at timestamptz,
            delivered_at timestamptz,
            last_error text
        );
        CREATE INDEX outbox_request ON outbox (request_id, id);
        CREATE INDEX outbox_pending ON outbox (request_id, id) WHERE delivered_at IS NULL;

        CREATE TABLE notified_steps (
            event_id bigint NOT NULL,
            step text NOT NULL,
            PRIMARY KEY (event_id, step)
        );

        CREATE TABLE uploads (
            id bigserial PRIMARY KEY,
            uploader text NOT NULL,
            channel text NOT NULL DEFAULT '',
            product_key text NOT NULL DEFAULT '',
            pasted text NOT NULL DEFAULT '',
            origin_data jsonb NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL,
            done_at timestamptz,
            request_id bigint
        );
        CREATE INDEX uploads_unread ON uploads (id) WHERE done_at IS NULL;
        """
    )


@migration
def m002_approvals(cur: psycopg.Cursor[Any]) -> None:
    """Approvals by more than one person, the rule each request is decided under, the requester's
    reason, which request retried a failed check, and the reminders sent."""
    cur.execute(
        """
        CREATE TABLE approvals (
            request_id bigint NOT NULL REFERENCES requests (id),
            approver text NOT NULL,
            at timestamptz NOT NULL,
            reason text,
            PRIMARY KEY (request_id, approver)
        );
        ALTER TABLE requests
            ADD COLUMN rule jsonb,
            ADD COLUMN justification text,
            ADD COLUMN retried_as bigint,
            ADD COLUMN reminders_sent integer NOT NULL DEFAULT 0;
        """
    )


@migration
def m003_rejected_nicknames(cur: psycopg.Cursor[Any]) -> None:
    """The nickname given beside a line refused locally, for the outcome report."""
    cur.execute("ALTER TABLE rejected_lines ADD COLUMN nickname text")


@migration
def m004_begun_steps(cur: psycopg.Cursor[Any]) -> None:
    """A notification step that posts is marked begun before it posts, so that a redelivery after a
    crash between Slack's answer and ``notified_steps`` looks for the message before posting again."""
    cur.execute(
        """
        CREATE TABLE begun_steps (
            event_id bigint NOT NULL,
            step text NOT NULL,
            begun_at timestamptz NOT NULL,
            PRIMARY KEY (event_id, step)
        )
        """
    )


@migration
def m005_leases(cur: psycopg.Cursor[Any]) -> None:
    """Leases on shared work, and each request's next due step, so that several replicas on one
    database run each step once. Columns are added, none changed: an older iotreg still running
    beside them ignores them (see the README on rolling deploys)."""
    cur.execute(
        """
        CREATE TABLE leases (
            name text PRIMARY KEY,
            owner text NOT NULL,
            until timestamptz NOT NULL
        );
        ALTER TABLE requests
            ADD COLUMN next_step_at timestamptz,
            ADD COLUMN wakes bigint NOT NULL DEFAULT 0;
        CREATE INDEX requests_next_step_at ON requests (next_step_at) WHERE next_step_at IS NOT NULL;
        """
    )
    # Every unfinished request is due: swept at once.
    cur.execute("UPDATE requests SET next_step_at = updated_at WHERE NOT (state = ANY(%s))", [[str(s) for s in State if s.final]])


@migration
def m006_iot_ids_read(cur: psycopg.Cursor[Any]) -> None:
    """When a chunk's IotIds were read. A request's result no longer waits for them; chunks whose
    creation ended before this column existed had theirs read before their result."""
    cur.execute("ALTER TABLE chunks ADD COLUMN iot_ids_read_at timestamptz")
    cur.execute(
        "UPDATE chunks SET iot_ids_read_at = COALESCE(register_confirmed_at, now()) WHERE status = ANY(%s)", [list(CREATION_ENDED)]
    )


@migration
def m007_quotas(cur: psycopg.Cursor[Any]) -> None:
    """The IoT Platform quotas, which every replica books its calls' slots against (see
    :meth:`PostgresStore.book_slot`)."""
    cur.execute(
        f"""
        CREATE TABLE quotas (
            action text PRIMARY KEY,
            qps double precision NOT NULL CHECK (qps > 0),
            -- The starts of the latest slots, oldest first, in seconds on the server's clock.
            granted double precision[] NOT NULL DEFAULT '{{}}',
            changed_at timestamptz NOT NULL DEFAULT now()
        -- Room in each page: a booking is a HOT update that touches no index.
        ) WITH (fillfactor = 50);

        -- One booking, one statement: the row lock puts concurrent bookings in line (first come,
        -- first served), and the time is the server's, whatever the replicas' clocks say.
        CREATE FUNCTION iotreg_book_slot(wanted text, margin double precision, retake double precision)
        RETURNS TABLE (slot_wait double precision, slot_start double precision, slot_qps double precision, slot_retaken boolean)
        LANGUAGE plpgsql
        SET lock_timeout = '{BOOKING_LOCK_TIMEOUT}s'
        AS $$
        DECLARE
            quota quotas%ROWTYPE;
            now_ double precision;
            n integer;
            calls integer;
            at double precision;
        BEGIN
            SELECT * INTO quota FROM quotas WHERE action = wanted FOR UPDATE;
            IF NOT FOUND THEN
                RETURN;
            END IF;
            now_ := extract(epoch FROM clock_timestamp())::double precision;
            n := cardinality(quota.granted);
            IF retake IS NOT NULL AND n > 0 AND quota.granted[n] = retake THEN
                UPDATE quotas SET granted[n] = now_ WHERE action = wanted;
                RETURN QUERY SELECT 0.0::double precision, now_, quota.qps, true;
                RETURN;
            END IF;
            calls := greatest(1, floor(quota.qps))::integer;
            at := CASE WHEN n < calls THEN now_
                       ELSE greatest(now_, quota.granted[n - calls + 1] + calls / quota.qps * (1 + margin)) END;
            UPDATE quotas SET granted = (quota.granted || at)[greatest(1, n + 2 - calls):n + 1] WHERE action = wanted;
            RETURN QUERY SELECT at - now_, at, quota.qps, false;
        END
        $$;
        """
    )


@migration
def m008_slot_spacing(cur: psycopg.Cursor[Any]) -> None:
    """Booking with a spacing: two slots of one action at least ``spacing`` of a slot's time apart.
    A new overload beside :func:`m007_quotas`'s, which a replica of the previous version still calls."""
    cur.execute(
        f"""
        CREATE FUNCTION iotreg_book_slot(wanted text, margin double precision, retake double precision, spacing double precision)
        RETURNS TABLE (slot_wait double precision, slot_start double precision, slot_qps double precision, slot_retaken boolean)
        LANGUAGE plpgsql
        SET lock_timeout = '{BOOKING_LOCK_TIMEOUT}s'
        AS $$
        DECLARE
            quota quotas%ROWTYPE;
            now_ double precision;
            n integer;
            calls integer;
            window_ double precision;
            at double precision;
        BEGIN
            SELECT * INTO quota FROM quotas WHERE action = wanted FOR UPDATE;
            IF NOT FOUND THEN
                RETURN;
            END IF;
            now_ := extract(epoch FROM clock_timestamp())::double precision;
            n := cardinality(quota.granted);
            IF retake IS NOT NULL AND n > 0 AND quota.granted[n] = retake THEN
                UPDATE quotas SET granted[n] = now_ WHERE action = wanted;
                RETURN QUERY SELECT 0.0::double precision, now_, quota.qps, true;
                RETURN;
            END IF;
            calls := greatest(1, floor(quota.qps))::integer;
            window_ := calls / quota.qps * (1 + margin);
            at := CASE WHEN n < calls THEN now_ ELSE greatest(now_, quota.granted[n - calls + 1] + window_) END;
            IF spacing > 0 AND n > 0 THEN
                at := greatest(at, quota.granted[n] + window_ / calls * spacing);
            END IF;
            UPDATE quotas SET granted = (quota.granted || at)[greatest(1, n + 2 - calls):n + 1] WHERE action = wanted;
            RETURN QUERY SELECT at - now_, at, quota.qps, false;
        END
        $$;
        """
    )


@migration
def m009_slot_tickets(cur: psycopg.Cursor[Any]) -> None:
    """Slots as numbered tickets in lanes, and a late holder's slot moved rather than lost: the SQL
    twin of :class:`bot.slots.Schedule`. ``granted`` now holds the slots of tickets ``last_ticket -
    cardinality(granted) + 1`` to ``last_ticket`` (every one still to come or late enough to move),
    ``lanes`` their lanes, ``lane_last`` each lane's latest start, ``spaced`` the last ticket's start
    as booked; the latest slots kept so far become one lane each.

    ``iotreg_book_slot``, which replicas of the previous versions call (by a slot's start), books
    through the new function too: every replica keeps one schedule while a deploy rolls."""
    # What each of the functions answers, and how each starts: locked on its quota's row.
    slot_row = "slot_wait double precision, slot_start double precision, slot_qps double precision, slot_retaken boolean, slot_ticket bigint"
    locked = f"LANGUAGE plpgsql SET lock_timeout = '{BOOKING_LOCK_TIMEOUT}s' AS $$ DECLARE"
    cur.execute(
        f"""
        ALTER TABLE quotas
            ADD COLUMN last_ticket bigint NOT NULL DEFAULT 0,
            ADD COLUMN lanes integer[] NOT NULL DEFAULT '{{}}',
            ADD COLUMN lane_last double precision[] NOT NULL DEFAULT '{{}}',
            ADD COLUMN spaced double precision NOT NULL DEFAULT '-Infinity';
        UPDATE quotas SET last_ticket = cardinality(granted), lane_last = granted,
            spaced = coalesce((SELECT max(g) FROM unnest(granted) AS g), '-Infinity'),
            lanes = ARRAY(SELECT k - 1 FROM generate_subscripts(granted, 1) AS k ORDER BY k);

        CREATE FUNCTION iotreg_book_ticket(wanted text, margin double precision, retake bigint, spacing double precision)
        RETURNS TABLE ({slot_row})
        {locked}
            quota quotas%ROWTYPE;
            now_ double precision;
            starts double precision[];
            lanes_ integer[];
            last_ double precision[];
            n integer;
            calls integer;
            window_ double precision;
            movable double precision;
            drop_ integer := 0;
            i integer;
            lane integer := 1;
            at double precision;
        BEGIN
            SELECT * INTO quota FROM quotas WHERE action = wanted FOR UPDATE;
            IF NOT FOUND THEN
                RETURN;
            END IF;
            now_ := extract(epoch FROM clock_timestamp())::double precision;
            calls := greatest(1, floor(quota.qps))::integer;
            window_ := calls / quota.qps * (1 + margin);
            movable := window_ * {MOVE_WITHIN};
            starts := quota.granted;
            lanes_ := quota.lanes;
            last_ := quota.lane_last;
            n := cardinality(starts);
            -- calls lanes: a quota raised adds lanes, each busy until its latest kept slot (a lane of
            -- an earlier, higher quota may still hold some: every slot of the last window is kept);
            -- one lowered keeps calls of them, each busy until the latest slot of any.
            IF cardinality(last_) < calls THEN
                last_ := last_ || ARRAY(
                    SELECT coalesce((SELECT max(t.s) FROM unnest(starts, lanes_) AS t(s, l) WHERE t.l = k - 1), '-Infinity')
                    FROM generate_series(cardinality(last_) + 1, calls) AS k ORDER BY k);
            ELSIF cardinality(last_) > calls THEN
                last_ := array_fill((SELECT max(l) FROM unnest(last_) AS l), ARRAY[calls]);
            END IF;
            -- Forget the oldest slots: a window ago, too old to move or to hold up a lane.
            WHILE drop_ < n AND starts[drop_ + 1] < now_ - window_ LOOP
                drop_ := drop_ + 1;
            END LOOP;
            IF drop_ > 0 THEN
                starts := starts[drop_ + 1:n];
                lanes_ := lanes_[drop_ + 1:n];
                n := n - drop_;
            END IF;
            i := CASE WHEN retake BETWEEN quota.last_ticket - n + 1 AND quota.last_ticket
                      THEN (retake - (quota.last_ticket - n))::integer END;
            IF i IS NOT NULL AND now_ <= starts[i] + movable THEN
                -- A late holder goes now: its slot counts from now, its lane's later slots a window after it.
                UPDATE quotas SET granted = starts, lanes = lanes_, lane_last = last_ WHERE action = wanted;
                PERFORM iotreg_slot_went(wanted, retake, now_, margin);
                at := greatest(starts[i], now_);
                RETURN QUERY SELECT at - now_, at, quota.qps, true, retake;
                RETURN;
            END IF;
            -- The lane that has room soonest.
            FOR k IN 2..calls LOOP
                IF last_[k] < last_[lane] THEN
                    lane := k;
                END IF;
            END LOOP;
            at := greatest(now_, last_[lane] + window_);
            IF spacing > 0 THEN  -- after the last ticket as it was booked (a lane moved since holds up only itself)
                at := greatest(at, quota.spaced + window_ / calls * spacing);
            END IF;
            last_[lane] := at;
            UPDATE quotas SET granted = starts || at, lanes = lanes_ || (lane - 1), lane_last = last_,
                              last_ticket = quota.last_ticket + 1, spaced = at
            WHERE action = wanted;
            RETURN QUERY SELECT at - now_, at, quota.qps, false, quota.last_ticket + 1;
        END
        $$;

        -- A ticket's slot as it stands now; the row lock waits for a booking being made.
        CREATE FUNCTION iotreg_slot_of(wanted text, ticket bigint)
        RETURNS TABLE ({slot_row})
        {locked}
            quota quotas%ROWTYPE;
            i bigint;
        BEGIN
            SELECT * INTO quota FROM quotas WHERE action = wanted FOR UPDATE;
            IF NOT FOUND THEN
                RETURN;
            END IF;
            i := ticket - (quota.last_ticket - cardinality(quota.granted));
            IF i < 1 OR i > cardinality(quota.granted) THEN
                RETURN;
            END IF;
            RETURN QUERY SELECT quota.granted[i] - extract(epoch FROM clock_timestamp())::double precision,
                                quota.granted[i], quota.qps, false, ticket;
        END
        $$;

        -- A ticket's call went at went_at, later than its slot: counted from then, its lane after it.
        CREATE FUNCTION iotreg_slot_went(wanted text, ticket bigint, went_at double precision, margin double precision)
        RETURNS void
        {locked}
            quota quotas%ROWTYPE;
            starts double precision[];
            n integer;
            i integer;
            lane integer;
            previous double precision;
            window_ double precision;
        BEGIN
            SELECT * INTO quota FROM quotas WHERE action = wanted FOR UPDATE;
            IF NOT FOUND THEN
                RETURN;
            END IF;
            starts := quota.granted;
            n := cardinality(starts);
            IF ticket NOT BETWEEN quota.last_ticket - n + 1 AND quota.last_ticket THEN
                RETURN;
            END IF;
            i := (ticket - (quota.last_ticket - n))::integer;
            IF went_at <= starts[i] THEN
                RETURN;
            END IF;
            window_ := greatest(1, floor(quota.qps)) / quota.qps * (1 + margin);
            lane := quota.lanes[i];
            starts[i] := went_at;
            previous := went_at;
            FOR j IN i + 1..n LOOP
                IF quota.lanes[j] = lane THEN
                    starts[j] := greatest(starts[j], previous + window_);
                    previous := starts[j];
                END IF;
            END LOOP;
            IF lane < cardinality(quota.lane_last) THEN
                UPDATE quotas SET granted = starts, lane_last[lane + 1] = greatest(lane_last[lane + 1], previous)
                WHERE action = wanted;
            ELSE  -- a lane of a quota since lowered: every lane waits for it
                UPDATE quotas SET granted = starts,
                    lane_last = ARRAY(SELECT greatest(l, previous) FROM unnest(lane_last) WITH ORDINALITY AS t(l, k) ORDER BY k)
                WHERE action = wanted;
            END IF;
        END
        $$;

        -- The previous versions' calls, by a slot's start: one schedule for every replica.
        CREATE OR REPLACE FUNCTION iotreg_book_slot(wanted text, margin double precision, retake double precision, spacing double precision)
        RETURNS TABLE (slot_wait double precision, slot_start double precision, slot_qps double precision, slot_retaken boolean)
        LANGUAGE sql
        AS $$
            SELECT b.slot_wait, b.slot_start, b.slot_qps, b.slot_retaken
            FROM iotreg_book_ticket(
                wanted, margin,
                (SELECT q.last_ticket - cardinality(q.granted) + array_position(q.granted, retake) FROM quotas q WHERE q.action = wanted),
                spacing) b
        $$;
        CREATE OR REPLACE FUNCTION iotreg_book_slot(wanted text, margin double precision, retake double precision)
        RETURNS TABLE (slot_wait double precision, slot_start double precision, slot_qps double precision, slot_retaken boolean)
        LANGUAGE sql
        AS $$ SELECT * FROM iotreg_book_slot(wanted, margin, retake, 0.0::double precision) $$;
        """
    )


#: Tables in the order they can be filled (a referenced table first), for copying a deployment.
TABLES = ("requests", "chunks", "devices", "rejected_lines", "approvals", "audit", "outbox", "notified_steps", "begun_steps", "uploads")
#: Tables whose ids a serial hands out, and the column.
SERIALS = {"requests": "id", "devices": "seq", "audit": "id", "outbox": "id", "uploads": "id"}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _json(value: Any) -> Jsonb:
    return Jsonb(value, dumps=_dumps)


def _text(value: Any) -> Any:
    """A value as stored: an enum as its value (psycopg would store an ``Enum``'s name)."""
    return value.value if isinstance(value, enum.Enum) else value


def _texts(values: Iterable[Any]) -> list[str]:
    return [str(_text(v)) for v in values]


def _assignments(values: dict[str, Any]) -> str:
    """``a = %s, b = %s`` for column names of our own (never from input)."""
    return ", ".join(f"{column} = %s" for column in values)


_REQUEST_COLUMNS = (
    "id, product_key, requester, origin, channel, kind, count, rejected_count, state, reason, decided_by,"
    " retry_of, polls, errors_in_row, origin_data, decided_at, expires_at, phase_started_at, created_at, updated_at,"
    " rule, justification, retried_as, reminders_sent"
)


def _request(r: Sequence[Any]) -> Request:
    return Request(
        id=r[0], product_key=r[1], requester=r[2], origin=Origin(r[3]), channel=r[4] or "", kind=Kind(r[5]),
        count=r[6], rejected_count=r[7], state=State(r[8]), reason=r[9], decided_by=r[10], retry_of=r[11],
        polls=r[12], errors_in_row=r[13], origin_data=r[14] or {}, decided_at=r[15], expires_at=r[16],
        phase_started_at=r[17], created_at=r[18], updated_at=r[19],
        rule=Rule.from_dict(r[20]) if r[20] else None, justification=r[21], retried_as=r[22], reminders_sent=r[23],
    )


_CHUNK_COLUMNS = (
    "request_id, chunk_no, size, apply_id, status, register_sent_at, register_confirmed_at, error, claimed_by, iot_ids_read_at"
)


def _chunk(r: Sequence[Any]) -> Chunk:
    return Chunk(*r)


def describe(url: str) -> str:
    """``host:port/database`` of a URL, for messages (no user, no password)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return redact_url(url)
    host = str(info.get("host") or "localhost")
    return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or '(default)'}"


class PostgresStore:
    """The PostgreSQL database behind the workflow; safe to share between threads and processes.

    ``timeout`` bounds how long a call waits for a connection (when the server is down, it then
    raises :class:`StoreUnavailable`); ``max_size`` is the pool's size.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, min_size: int = 1, max_size: int = 16) -> None:
        self.location = redact_url(url)
        self.reads_in_process = False  # every read is a round trip to the server
        self.many_processes = True
        self._where = describe(url)
        try:
            self._password = psycopg.conninfo.conninfo_to_dict(url).get("password")
        except psycopg.ProgrammingError:
            raise StoreUnavailable(f"cannot use the database URL {self.location}: it is not a PostgreSQL URL") from None
        # The session runs in UTC: timestamptz values come back as datetimes in timezone.utc.
        kwargs = {"connect_timeout": CONNECT_TIMEOUT, "application_name": "iotreg", "autocommit": True}
        try:
            with psycopg.connect(url, **kwargs) as conn:  # fails within CONNECT_TIMEOUT when unreachable
                migrate(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self._unavailable("cannot connect to", exc) from None
        except psycopg.ProgrammingError as exc:  # a malformed URL
            raise StoreUnavailable(f"cannot use the database URL {self.location}: {self._scrub(exc)}") from None
        self._freshness = _Freshness()
        self._pool = ConnectionPool(
            url,
            kwargs=kwargs,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            # A connection idle for a while is checked before it is lent: one the server dropped
            # is replaced instead of failing the call (psycopg_pool "Connection quality" docs). One
            # in use a moment ago is not: a round trip before every statement doubled the time of
            # the acks that read the database.
            check=self._freshness.check,
            configure=_configure,
            reconnect_timeout=60,
            name="iotreg",
            open=True,
        )

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r})"

    # -- connections --------------------------------------------------------------------------

    def _scrub(self, exc: BaseException) -> str:
        """The first line of an error, with the password (should the driver quote it) taken out."""
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return text.replace(self._password, "***") if self._password else text

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        detail = "no connection within the timeout" if isinstance(exc, PoolTimeout) else self._scrub(exc)
        return StoreUnavailable(f"{what} the PostgreSQL database {self._where}: {detail}")

    @contextmanager
    def _borrowed(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection (in autocommit: one statement is its own transaction)."""
        try:
            with self._pool.connection() as conn:
                try:
                    yield conn
                finally:
                    # Noted here, not in the pool's ``reset`` hook: with a hook, every connection
                    # given back goes through the pool's worker thread (psycopg_pool's putconn), a
                    # hand-off between threads for every statement.
                    self._freshness.returned(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise self._unavailable("lost", exc) from None

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction, committed at the end (rolled back on an error)."""
        with self._borrowed() as conn, conn.transaction():
            yield conn

    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement on its own (reads, and writes of a single statement): no BEGIN and COMMIT round trips."""
        with self._borrowed() as conn:
            return conn.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._borrowed() as conn:
            return conn.execute(sql, args).rowcount

    def _update(self, table: str, where: str, args: Sequence[Any], fields: dict[str, Any]) -> None:
        """Set ``fields`` on the rows of ``table`` that match ``where`` (both of our own, never input)."""
        if fields:
            values = [_text(v) for v in fields.values()]
            self._execute(f"UPDATE {table} SET {_assignments(fields)} WHERE {where}", [*values, *args])

    def close(self) -> None:
        self._pool.close()

    def schema_version(self) -> list[str]:
        return [r[0] for r in self._fetch("SELECT name FROM schema_migrations ORDER BY name")]

    def ping(self) -> None:
        self._fetch("SELECT 1")

    def hold(self, purpose: str) -> None:
        """PostgreSQL serves many processes at once: every claim is accepted."""

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
        """Insert a request with its devices ``(name, nickname, line)``, chunks and rejected lines.

        The devices go by binary ``COPY`` (100,000 in about a second: ``bench/bench_store.py``).
        """
        with self.connection() as conn:
            cur = conn.cursor()
            cur.execute(
                "INSERT INTO requests (product_key, requester, origin, channel, origin_data, kind, count, rejected_count,"
                " state, retry_of, rule, justification, decided_by, decided_at, expires_at, phase_started_at, created_at,"
                " updated_at, next_step_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " RETURNING id",
                [product_key, requester, str(origin), channel, _json(origin_data or {}), str(kind), count,
                 rejected_count or len(rejected), str(state), retry_of, _json(rule.as_dict()) if rule else None,
                 justification, decided_by, now if decided_by else None, expires_at, now, now, now,
                 None if state.final else now],  # due at once, in the same transaction: any replica's sweep starts it
            )
            request_id = cur.fetchone()[0]
            with cur.copy("COPY devices (request_id, name, nickname, chunk_no, line) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "text", "text", "int4", "int4"])  # binary: no text for the server to parse
                for index, (name, nickname, line) in enumerate(devices):
                    copy.write_row((request_id, name, nickname, index // chunk_size, line))
            if chunks:
                cur.executemany(
                    "INSERT INTO chunks (request_id, chunk_no, size) VALUES (%s, %s, %s)",
                    [(request_id, n, size) for n, size in enumerate(chunks)],
                )
            if rejected:
                with cur.copy("COPY rejected_lines (request_id, line, value, reason, nickname) FROM STDIN") as copy:
                    for row in rejected:  # (line, value, reason[, nickname])
                        copy.write_row((request_id, *row[:3], row[3] if len(row) > 3 else None))
            if retry_of is not None:
                # Compare-and-set in the same transaction: however many clicks, one retry request.
                cur.execute("UPDATE requests SET retried_as = %s WHERE id = %s AND retried_as IS NULL", [request_id, retry_of])
                if cur.rowcount != 1:
                    found = cur.execute("SELECT retried_as FROM requests WHERE id = %s", [retry_of]).fetchone()
                    raise AlreadyRetried(retry_of, found[0] if found else None)  # rolls the new request back
            detail: dict[str, Any] = {"product_key": product_key, "count": count}
            if rule is not None:
                detail["rule"] = rule.source
            if justification:
                detail["reason"] = justification
            _audit(cur, request_id, requester, "requested", detail, now)
            for audit_event, audit_detail in audit:
                _audit(cur, request_id, decided_by or requester, audit_event, audit_detail, now)
            if event:
                _enqueue(cur, request_id, event[0], event[1], now)
            if upload_id is not None:
                # In the same transaction: an upload read again after a crash cannot make a second request.
                cur.execute("UPDATE uploads SET done_at = %s, request_id = %s WHERE id = %s AND done_at IS NULL", [now, request_id, upload_id])
                if cur.rowcount != 1:
                    raise AlreadyRead(upload_id)  # rolls the request back
        log_transition(int(request_id), product_key, state, "requested", count, rejected_count or len(rejected), requester)
        return int(request_id)

    def get(self, request_id: int) -> Request | None:
        rows = self._fetch(f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE id = %s", [request_id])
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
        """Newest first (``limit`` of them, or all with ``None``)."""
        where, args = [], []
        if requester is not None:
            where.append("requester = %s")
            args.append(requester)
        if origins is not None:
            where.append("origin = ANY(%s)")
            args.append(_texts(origins))
        if states is not None:
            where.append("state = ANY(%s)")
            args.append(_texts(states))
        if channel is not None:
            where.append("channel = %s")
            args.append(channel)
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._fetch(f"SELECT {_REQUEST_COLUMNS} FROM requests {condition} ORDER BY id DESC LIMIT %s", [*args, limit])
        return [_request(r) for r in rows]

    def figures(self) -> Figures:
        """The metrics' counts in one round trip."""
        rows = self._fetch(
            "SELECT 'state', state, COUNT(*) FROM requests GROUP BY state"
            " UNION ALL SELECT 'outbox', '', COUNT(*) FROM outbox WHERE delivered_at IS NULL"
            " UNION ALL SELECT 'created', '', COUNT(*) FROM devices WHERE outcome = %s",
            [str(Outcome.CREATED)],
        )
        totals = {what: n for what, _, n in rows if what != "state"}
        return Figures(
            requests_by_state={State(state): n for what, state, n in rows if what == "state"},
            outbox_pending=totals["outbox"], devices_created=totals["created"],
        )

    def state_counts(self) -> dict[State, int]:
        return {State(state): count for state, count in self._fetch("SELECT state, COUNT(*) FROM requests GROUP BY state")}

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
        values = {column: _text(value) for column, value in fields.items()}
        values.update(state=str(to_state), updated_at=now)
        wake, at = (_WAKE_NOW, [now]) if to_state == State.APPROVED else ("", [])
        with self.connection() as conn:
            cur = conn.execute(
                f"UPDATE requests SET {_assignments(values)}{wake} WHERE id = %s AND state = ANY(%s)"
                " RETURNING product_key, count, rejected_count",
                [*values.values(), *at, request_id, _texts(from_states)],
            )
            moved = cur.fetchone()
            if moved is None:
                return False
            _audit(cur, request_id, actor, event, detail or {}, now)
            if notify:
                _enqueue(cur, request_id, notify[0], notify[1], now)
        log_transition(request_id, moved[0], to_state, event, moved[1], moved[2], actor)
        return True

    def add_approval(self, request_id: int, *, approver: str, now: datetime, needed: int, reason: str | None = None) -> Tally:
        """Count one approval; the one that completes the quorum approves the request.

        One transaction that locks the request's row first (``FOR UPDATE``), so concurrent
        approvals are counted one after the other and exactly one of them reaches the quorum.
        """
        with self.connection() as conn:
            cur = conn.cursor()
            row = cur.execute("SELECT state FROM requests WHERE id = %s FOR UPDATE", [request_id]).fetchone()
            if row is None or row[0] != State.AWAITING_APPROVAL:
                return Tally.CLOSED
            cur.execute(
                "INSERT INTO approvals (request_id, approver, at, reason) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [request_id, approver, now, reason or None],
            )
            if cur.rowcount != 1:
                return Tally.ALREADY_COUNTED
            approvers = [r[0] for r in cur.execute(
                "SELECT approver FROM approvals WHERE request_id = %s ORDER BY at, approver", [request_id]).fetchall()]
            _audit(cur, request_id, approver, "approval", {"reason": reason or "", "count": len(approvers), "needed": needed}, now)
            if len(approvers) < needed:
                _enqueue(cur, request_id, "approval", {"by": approver, "count": len(approvers), "needed": needed}, now)
                return Tally.COUNTED
            moved = cur.execute(
                f"UPDATE requests SET state = %s, decided_by = %s, decided_at = %s, updated_at = %s{_WAKE_NOW} WHERE id = %s AND state = %s"
                " RETURNING product_key, count, rejected_count",
                [str(State.APPROVED), approver, now, now, now, request_id, str(State.AWAITING_APPROVAL)],
            ).fetchone()
            if moved is None:  # cannot happen while the row is locked; kept as the compare-and-set
                raise RuntimeError(f"request #{request_id} changed state while its approval was counted")
            _audit(cur, request_id, approver, "approved", {"approvers": approvers, "needed": needed}, now)
            _enqueue(cur, request_id, "approved", {"by": approver, "approvers": approvers}, now)
        log_transition(request_id, moved[0], State.APPROVED, "approved", moved[1], moved[2], approver)
        return Tally.QUORUM

    def approvals(self, request_id: int) -> list[Approval]:
        rows = self._fetch("SELECT approver, at, reason FROM approvals WHERE request_id = %s ORDER BY at, approver", [request_id])
        return [Approval(*r) for r in rows]

    def add_reminder(self, request_id: int, *, sent: int, now: datetime, payload: dict[str, Any]) -> bool:
        """Record reminder number ``sent`` and its event, once: ``False`` if it was sent already or
        the request no longer waits for approval."""
        with self.connection() as conn:
            cur = conn.execute(
                "UPDATE requests SET reminders_sent = %s WHERE id = %s AND state = %s AND reminders_sent = %s",
                [sent, request_id, str(State.AWAITING_APPROVAL), sent - 1],
            )
            if cur.rowcount != 1:
                return False
            _audit(cur, request_id, SYSTEM, "reminded", payload, now)
            _enqueue(cur, request_id, "reminder", payload, now)
        return True

    def update_request(self, request_id: int, **fields: Any) -> None:
        """Book-keeping that is not a state change (poll counters, error counts)."""
        self._update("requests", "id = %s", [request_id], fields)

    def update_origin_data(self, request_id: int, **values: Any) -> None:
        """Merge ``values`` into ``origin_data`` in one statement (``None`` removes a key)."""
        kept = {k: v for k, v in values.items() if v is not None}
        removed = [k for k, v in values.items() if v is None]
        self._execute(
            "UPDATE requests SET origin_data = (origin_data || %s) - %s::text[] WHERE id = %s",
            [_json(kept), removed, request_id],
        )

    # -- chunks and devices -------------------------------------------------------------------

    def chunks(self, request_id: int) -> list[Chunk]:
        rows = self._fetch(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE request_id = %s ORDER BY chunk_no", [request_id])
        return [_chunk(r) for r in rows]

    def update_chunk(self, request_id: int, chunk_no: int, **fields: Any) -> None:
        self._update("chunks", "request_id = %s AND chunk_no = %s", [request_id, chunk_no], fields)

    def claim_register(
        self, request_id: int, chunk_no: int, owner: str, now: datetime, *, replacing: datetime | None = None
    ) -> bool:
        """Claim a chunk's register call before sending it; ``False`` if another claim got there first.

        With ``replacing``, take over a claim whose ``register_sent_at`` is that time, and only that one.
        """
        condition = "register_sent_at IS NULL" if replacing is None else "register_sent_at = %s"
        args: list[Any] = [now, owner, request_id, chunk_no]
        if replacing is not None:
            args.append(replacing)
        condition += " AND EXISTS (SELECT 1 FROM leases WHERE name = 'request:' || chunks.request_id AND owner = %s AND until > %s)"
        args += [owner, now]
        sql = f"UPDATE chunks SET register_sent_at = %s, claimed_by = %s WHERE request_id = %s AND chunk_no = %s AND {condition}"
        return self._execute(sql, args) == 1

    def release_register(self, request_id: int, chunk_no: int, owner: str) -> None:
        """Give up a claim whose call certainly did not reach the platform."""
        self._execute(
            "UPDATE chunks SET register_sent_at = NULL, claimed_by = NULL WHERE request_id = %s AND chunk_no = %s AND claimed_by = %s",
            [request_id, chunk_no, owner],
        )

    def chunk_for_apply_id(self, apply_id: int) -> Chunk | None:
        rows = self._fetch(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE apply_id = %s", [apply_id])
        return _chunk(rows[0]) if rows else None

    def device_names(self, request_id: int, chunk_no: int | None = None) -> list[tuple[str, str | None]]:
        """``(name, nickname)`` in the order they were given."""
        if chunk_no is None:
            return self._fetch("SELECT name, nickname FROM devices WHERE request_id = %s ORDER BY seq", [request_id])
        return self._fetch(
            "SELECT name, nickname FROM devices WHERE request_id = %s AND chunk_no = %s ORDER BY seq", [request_id, chunk_no]
        )

    def devices(self, request_id: int, *, outcome: Outcome | None = None, limit: int | None = None) -> list[DeviceRow]:
        sql = "SELECT name, nickname, chunk_no, line, outcome, reason, iot_id FROM devices WHERE request_id = %s"
        args: list[Any] = [request_id]
        if outcome is not None:
            sql += " AND outcome = %s"
            args.append(str(outcome))
        rows = self._fetch(sql + " ORDER BY seq LIMIT %s", [*args, limit])
        return [DeviceRow(n, nick, c, line, Outcome(o), reason, iot) for n, nick, c, line, o, reason, iot in rows]

    def outcome_counts(self, request_id: int) -> dict[Outcome, int]:
        rows = self._fetch("SELECT outcome, COUNT(*) FROM devices WHERE request_id = %s GROUP BY outcome", [request_id])
        return {Outcome(outcome): count for outcome, count in rows}

    def add_devices(self, request_id: int, chunk_no: int, rows: Iterable[tuple[str, Outcome, str]]) -> None:
        """Devices named by the platform (``BatchRegisterDevice``): ``(name, outcome, iot_id)``;
        one already recorded is left as it is."""
        rows = [(request_id, name, chunk_no, str(outcome), iot_id) for name, outcome, iot_id in rows]
        if rows:
            with self.connection() as conn:
                conn.cursor().executemany(
                    "INSERT INTO devices (request_id, name, chunk_no, outcome, iot_id) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT DO NOTHING",
                    rows,
                )

    def set_outcomes(self, request_id: int, rows: Iterable[tuple[str, Outcome, str | None, str | None]]) -> None:
        """Record ``(name, outcome, reason, iot_id)`` for devices of a request, in one statement."""
        names, outcomes, reasons, iot_ids = [], [], [], []
        for name, outcome, reason, iot_id in rows:
            names.append(name)
            outcomes.append(str(outcome))
            reasons.append(reason)
            iot_ids.append(iot_id)
        if names:
            self._execute(
                "UPDATE devices AS d SET outcome = v.outcome, reason = v.reason, iot_id = COALESCE(v.iot_id, d.iot_id)"
                " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS v(name, outcome, reason, iot_id)"
                " WHERE d.request_id = %s AND d.name = v.name",
                [names, outcomes, reasons, iot_ids, request_id],
            )

    def set_reasons(self, request_id: int, outcome: Outcome, reason: str) -> None:
        """Give every device of ``outcome`` that has no reason yet this one."""
        self._execute(
            "UPDATE devices SET reason = %s WHERE request_id = %s AND outcome = %s AND reason IS NULL",
            [reason, request_id, str(outcome)],
        )

    def rejected_lines(self, request_id: int) -> list[RejectedLine]:
        rows = self._fetch("SELECT line, value, reason, nickname FROM rejected_lines WHERE request_id = %s ORDER BY line", [request_id])
        return [RejectedLine(*r) for r in rows]

    # -- uploads ------------------------------------------------------------------------------

    def add_upload(
        self, *, user: str, channel: str, product_key: str, pasted: str, origin_data: dict[str, Any], now: datetime
    ) -> int:
        rows = self._fetch(
            "INSERT INTO uploads (uploader, channel, product_key, origin_data, pasted, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            [user, channel, product_key, _json(origin_data), pasted, now],
        )
        return int(rows[0][0])

    def finish_upload(self, upload_id: int, now: datetime) -> None:
        """An upload that made no request (its list was refused, and the uploader told)."""
        self._execute("UPDATE uploads SET done_at = %s WHERE id = %s AND done_at IS NULL", [now, upload_id])

    def upload(self, upload_id: int) -> Upload | None:
        found = self._uploads("id = %s AND done_at IS NULL", [upload_id])
        return found[0] if found else None

    def unread_uploads(self) -> list[Upload]:
        return self._uploads("done_at IS NULL", [])

    def _uploads(self, where: str, args: list[Any]) -> list[Upload]:
        rows = self._fetch(
            f"SELECT id, uploader, channel, product_key, pasted, origin_data FROM uploads WHERE {where} ORDER BY id", args
        )
        return [Upload(r[0], r[1], r[2], r[3], r[4] or "", r[5] or {}) for r in rows]

    # -- audit --------------------------------------------------------------------------------

    def audit(self, request_id: int | None = None, *, limit: int = 500) -> list[AuditEntry]:
        """The audit trail, oldest first (of one request, or of all)."""
        sql = "SELECT request_id, at, actor, event, detail FROM audit"
        if request_id is None:
            rows = self._fetch(sql + " ORDER BY id LIMIT %s", [limit])
        else:
            rows = self._fetch(sql + " WHERE request_id = %s ORDER BY id LIMIT %s", [request_id, limit])
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4] or {}) for r in rows]

    def record(self, request_id: int, actor: str, event: str, now: datetime, detail: dict[str, Any] | None = None) -> None:
        """An audit row that goes with no state change (a denied click, an API error)."""
        with self.connection() as conn:
            _audit(conn.cursor(), request_id, actor, event, detail or {}, now)

    # -- outbox -------------------------------------------------------------------------------

    def enqueue(self, request_id: int, kind: str, payload: dict[str, Any], now: datetime) -> None:
        with self.connection() as conn:
            _enqueue(conn.cursor(), request_id, kind, payload, now)

    def _origin_join(self, origins: Iterable[Origin] | None) -> tuple[str, list[Any]]:
        if origins is None:
            return "", []
        return " JOIN requests AS r ON r.id = o.request_id AND r.origin = ANY(%s)", [_texts(origins)]

    def pending_events(self, origins: Iterable[Origin] | None = None) -> Iterator[Event]:
        """Every undelivered event (of requests from ``origins``, if given), oldest first."""
        join, args = self._origin_join(origins)
        rows = self._fetch(
            f"SELECT o.id, o.request_id, o.kind, o.payload, o.attempts, o.next_at FROM outbox AS o{join}"
            " WHERE o.delivered_at IS NULL ORDER BY o.id",
            args,
        )
        for r in rows:
            yield Event(r[0], r[1], EventKind(r[2]), r[3], r[4], r[5])

    def pending_count(self, origins: Iterable[Origin] | None = None) -> int:
        join, args = self._origin_join(origins)
        return int(self._fetch(f"SELECT COUNT(*) FROM outbox AS o{join} WHERE o.delivered_at IS NULL", args)[0][0])

    def next_event_time(self, origins: Iterable[Origin] | None = None) -> datetime | None:
        """When the next event can go: the earliest among the first undelivered event of each request."""
        join, args = self._origin_join(origins)
        rows = self._fetch(
            f"SELECT MIN(o.next_at) FROM outbox AS o{join} WHERE o.delivered_at IS NULL AND o.id ="
            " (SELECT MIN(id) FROM outbox WHERE request_id = o.request_id AND delivered_at IS NULL)",
            args,
        )
        return rows[0][0] if rows else None

    def mark_delivered(self, event_id: int, now: datetime) -> None:
        self._execute("UPDATE outbox SET delivered_at = %s WHERE id = %s", [now, event_id])

    def mark_failed(self, event_id: int, error: str, next_at: datetime) -> None:
        self._execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = %s, next_at = %s WHERE id = %s",
            [error[:500], next_at, event_id],
        )

    def step_done(self, event_id: int, step: str) -> bool:
        return bool(self._fetch("SELECT 1 FROM notified_steps WHERE event_id = %s AND step = %s", [event_id, step]))

    def mark_step(self, event_id: int, step: str) -> None:
        self._execute("INSERT INTO notified_steps (event_id, step) VALUES (%s, %s) ON CONFLICT DO NOTHING", [event_id, step])

    def begin_step(self, event_id: int, step: str, now: datetime) -> datetime | None:
        inserted = self._fetch(
            "INSERT INTO begun_steps (event_id, step, begun_at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING begun_at",
            [event_id, step, now],
        )
        if inserted:
            return None
        return self._fetch("SELECT begun_at FROM begun_steps WHERE event_id = %s AND step = %s", [event_id, step])[0][0]

    def delivered_events(self, request_id: int) -> list[Event]:
        rows = self._fetch(
            "SELECT id, request_id, kind, payload, attempts FROM outbox"
            " WHERE request_id = %s AND delivered_at IS NOT NULL ORDER BY id",
            [request_id],
        )
        return [Event(r[0], r[1], EventKind(r[2]), r[3], r[4]) for r in rows]

    def next_event(self, request_id: int) -> Event | None:
        rows = self._fetch(
            "SELECT id, request_id, kind, payload, attempts, next_at FROM outbox"
            " WHERE request_id = %s AND delivered_at IS NULL ORDER BY id LIMIT 1",
            [request_id],
        )
        return Event(rows[0][0], rows[0][1], EventKind(rows[0][2]), rows[0][3], rows[0][4], rows[0][5]) if rows else None

    # -- leases and due steps -----------------------------------------------------------------

    def take_lease(self, name: str, owner: str, now: datetime, until: datetime) -> bool:
        """One statement: the row lock of the conflicting row decides between two takers."""
        return self._execute(
            "INSERT INTO leases (name, owner, until) VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE"
            " SET owner = excluded.owner, until = excluded.until WHERE leases.owner = excluded.owner OR leases.until <= %s",
            [name, owner, until, now],
        ) == 1

    def renew_leases(self, owner: str, until: datetime) -> set[str]:
        return {r[0] for r in self._fetch("UPDATE leases SET until = %s WHERE owner = %s RETURNING name", [until, owner])}

    def release_lease(self, name: str, owner: str) -> None:
        self._execute("DELETE FROM leases WHERE name = %s AND owner = %s", [name, owner])

    def release_leases(self, owner: str) -> int:
        return self._execute("DELETE FROM leases WHERE owner = %s", [owner])

    def leases(self) -> list[Lease]:
        return [Lease(*r) for r in self._fetch("SELECT name, owner, until FROM leases ORDER BY name")]

    def wake_request(self, request_id: int, at: datetime) -> None:
        self._execute(
            "UPDATE requests SET next_step_at = LEAST(next_step_at, %s), wakes = wakes + 1 WHERE id = %s", [at, request_id]
        )

    def begin_request_step(self, request_id: int, now: datetime, fallback: datetime) -> StepTurn:
        """One statement (a round trip on every step): the row locked, read as it was, and its due
        time moved to ``fallback`` only if it was due."""
        rows = self._fetch(
            "WITH old AS (SELECT id, next_step_at, wakes FROM requests WHERE id = %s FOR UPDATE)"
            " UPDATE requests AS r SET next_step_at = CASE WHEN old.next_step_at IS NULL OR old.next_step_at <= %s"
            " THEN %s ELSE old.next_step_at END FROM old WHERE r.id = old.id RETURNING old.next_step_at, old.wakes",
            [request_id, now, fallback],
        )
        if not rows:
            return StepTurn(True, None, 0)
        due_at, wakes = rows[0]
        return StepTurn(due_at is None or due_at <= now, due_at, wakes)

    def end_request_step(self, request_id: int, turn: StepTurn, at: datetime | None) -> datetime | None:
        """When nobody woke the request during the step its own time stands; else the earlier one."""
        rows = self._fetch(
            "UPDATE requests SET next_step_at = CASE WHEN wakes = %s THEN %s::timestamptz"
            " ELSE LEAST(next_step_at, %s::timestamptz) END WHERE id = %s RETURNING next_step_at",
            [turn.wakes, at, at, request_id],
        )
        return rows[0][0] if rows else None

    def due_requests(self, now: datetime, *, origins: Iterable[Origin] | None = None, limit: int = 100) -> list[int]:
        sql = (
            "SELECT r.id FROM requests AS r WHERE r.next_step_at <= %s"
            " AND NOT EXISTS (SELECT 1 FROM leases AS l WHERE l.name = 'request:' || r.id AND l.until > %s)"
        )
        args: list[Any] = [now, now]
        if origins is not None:
            sql += " AND r.origin = ANY(%s)"
            args.append(_texts(origins))
        return [r[0] for r in self._fetch(sql + " ORDER BY r.next_step_at LIMIT %s", [*args, limit])]

    # -- IotIds read after the result -----------------------------------------------------------

    def set_iot_ids(self, request_id: int, chunk_no: int, rows: Iterable[tuple[str, str]], now: datetime) -> int:
        """Give created devices their IotIds and mark the chunk's IotIds read, in one transaction."""
        names, iot_ids = [], []
        for name, iot_id in rows:
            names.append(name)
            iot_ids.append(iot_id)
        with self.connection() as conn:
            cursor = conn.execute(
                "UPDATE devices AS d SET iot_id = v.iot_id FROM unnest(%s::text[], %s::text[]) AS v(name, iot_id)"
                " WHERE d.request_id = %s AND d.name = v.name AND d.outcome = %s",
                [names, iot_ids, request_id, Outcome.CREATED.value],
            )
            conn.execute("UPDATE chunks SET iot_ids_read_at = %s WHERE request_id = %s AND chunk_no = %s", [now, request_id, chunk_no])
            return cursor.rowcount

    def unread_iot_ids(self, origins: Iterable[Origin] | None = None) -> list[int]:
        sql = (
            "SELECT DISTINCT r.id FROM chunks AS c JOIN requests AS r ON r.id = c.request_id"
            " WHERE c.iot_ids_read_at IS NULL AND c.status = ANY(%s) AND r.state = ANY(%s)"
        )
        args: list[Any] = [list(CREATION_ENDED), _texts(s for s in State if s.final)]
        if origins is not None:
            sql += " AND r.origin = ANY(%s)"
            args.append(_texts(origins))
        return [r[0] for r in self._fetch(sql + " ORDER BY r.id", args)]


    # -- the IoT Platform quotas, shared by every replica ----------------------------------------

    def quotas(self) -> dict[str, float]:
        return dict(self._fetch("SELECT action, qps FROM quotas ORDER BY action"))

    def set_quotas(self, quotas: Mapping[str, float], *, replace: bool = True) -> dict[str, tuple[float | None, float]]:
        _check_quotas(quotas)
        changed: dict[str, tuple[float | None, float]] = {}
        with self.connection() as conn:
            for action, qps in sorted(quotas.items()):  # two replicas lock the rows in the same order
                added = conn.execute(
                    "INSERT INTO quotas (action, qps) VALUES (%s, %s) ON CONFLICT (action) DO NOTHING RETURNING qps", [action, qps]
                ).fetchone()
                if added is not None:
                    changed[action] = (None, qps)
                    continue
                if not replace:
                    continue
                before = conn.execute("SELECT qps FROM quotas WHERE action = %s FOR UPDATE", [action]).fetchone()[0]
                if before != qps:
                    conn.execute("UPDATE quotas SET qps = %s, changed_at = now() WHERE action = %s", [qps, action])
                    changed[action] = (before, qps)
        return changed

    def book_slot(self, action: str, margin: float, retake: int | None = None, spacing: float = 0.0) -> Slot | None:
        """One statement (:func:`m009_slot_tickets`'s ``iotreg_book_ticket``): one round trip per call."""
        return self._slot("SELECT * FROM iotreg_book_ticket(%s, %s, %s, %s)", [action, margin, retake, spacing], action)

    def slot_of(self, action: str, ticket: int) -> Slot | None:
        return self._slot("SELECT * FROM iotreg_slot_of(%s, %s)", [action, ticket], action)

    def slot_went(self, action: str, ticket: int, at: float, margin: float) -> None:
        self._slot("SELECT iotreg_slot_went(%s, %s, %s, %s)", [action, ticket, at, margin], action)

    def _slot(self, sql: str, args: list[Any], action: str) -> Slot | None:
        with self._borrowed() as conn:
            try:
                rows = conn.execute(sql, args).fetchall()
            except psycopg.errors.LockNotAvailable:
                raise StoreUnavailable(
                    f"the quota of {action} in the PostgreSQL database {self._where} stayed locked for "
                    f"{BOOKING_LOCK_TIMEOUT} s by another session: end that session's transaction"
                ) from None
        return Slot(*rows[0]) if rows and len(rows[0]) > 1 else None


#: With an approval, in its transaction: the next step is due at once (the parameter: the
#: approval's time), so that no failure between the two can leave an approved request waiting.
_WAKE_NOW = ", next_step_at = LEAST(next_step_at, %s::timestamptz), wakes = wakes + 1"


def _audit(cur: psycopg.Cursor[Any], request_id: int, actor: str, event: str, detail: dict[str, Any], now: datetime) -> None:
    cur.execute(
        "INSERT INTO audit (request_id, at, actor, event, detail) VALUES (%s, %s, %s, %s, %s)",
        [request_id, now, actor, event, _json(detail)],
    )


def _enqueue(cur: psycopg.Cursor[Any], request_id: int, kind: str, payload: dict[str, Any], now: datetime) -> None:
    cur.execute(
        "INSERT INTO outbox (request_id, kind, payload, created_at, next_at) VALUES (%s, %s, %s, %s, %s)",
        [request_id, str(kind), _json(payload), now, now],
    )


#: A pooled connection idle longer than this is checked with a round trip before it is lent.
IDLE_CHECK = 2.0


class _Freshness:
    """When each pooled connection was last given back, so that only one idle for a while is checked.

    Connections are known by ``id()`` (psycopg's have no room for an attribute); a stale entry
    for a new connection that took an old one's place can only spare a check of a fresh one.
    """

    def __init__(self) -> None:
        self._returned: dict[int, float] = {}

    def check(self, conn: psycopg.Connection[Any]) -> None:
        returned = self._returned.get(id(conn))
        if returned is None or time.monotonic() - returned > IDLE_CHECK:
            ConnectionPool.check_connection(conn)

    def returned(self, conn: psycopg.Connection[Any]) -> None:
        if len(self._returned) > 1024:  # the pool's connections are far fewer: drop the forgotten
            self._returned.clear()
        self._returned[id(conn)] = time.monotonic()


def _check_quotas(quotas: Mapping[str, float]) -> None:
    for action, qps in quotas.items():
        if not qps > 0:
            raise ValueError(f"the quota for {action} must be above 0, not {qps}")


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Every connection runs in UTC (see the module docstring)."""
    conn.execute("SET TIME ZONE 'UTC'")


def migrate(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply the migrations not applied yet, in one transaction under the advisory lock; return their names."""
    _configure(conn)
    done: list[str] = []
    with conn.transaction(), conn.cursor() as cur:
        # Held to the end of the transaction: a second process waits here, then finds nothing to do.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
        cur.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        applied = {r[0] for r in cur.execute("SELECT name FROM schema_migrations").fetchall()}
        for name, function in MIGRATIONS:
            if name not in applied:
                function(cur)
                cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", [name])
                done.append(name)
    if done:
        log.info("PostgreSQL schema: applied %s", ", ".join(done))
    return done
