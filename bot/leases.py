"""Leases: which process does a piece of shared work, when several share one database.

Every step of a request runs under the lease ``request:<id>``, and every delivery of its
notifications under ``outbox:<id>``. A lease is a row (:meth:`bot.store.Store.take_lease`): taking
it is one atomic statement, so of two replicas that want the same step exactly one gets it, and
the other leaves it. A lease is short (:data:`LEASE_SECONDS`) and renewed every third of that by
a heartbeat thread while the process holds any, so a process that dies (SIGKILL, a lost machine)
loses its leases within that time and another process carries its work on; one that stops on
SIGTERM gives them back at once (:meth:`Leases.hand_back`).

Leases only decide *who*; what is due *when* is each request's ``next_step_at`` in the database,
which every replica sweeps (:meth:`bot.reconciler.Reconciler.sweep`). APScheduler stays each
process's local timer.

Times are the processes' clocks: replicas on several machines need them in step (NTP) to well
under the lease's length.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import timedelta

from bot.clock import Clock
from bot.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

#: Seconds a lease lasts without renewal: how long a dead process's work waits for another.
LEASE_SECONDS = 10.0
#: How long handing the leases back waits for a renewal under way (one statement) to end.
RENEWAL_WAIT = 10.0


def owner_token() -> str:
    """This process, as lease rows and register claims name it: ``host:pid:nonce``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """This process's leases on one store, renewed while held."""

    def __init__(self, store: Store, clock: Clock, *, seconds: float = LEASE_SECONDS, owner: str | None = None) -> None:
        self.store = store
        self.clock = clock
        self.seconds = seconds
        self.owner = owner or owner_token()
        self._held: set[str] = set()
        self._taking: set[str] = set()
        #: When each held lease was last taken or renewed (the clock's monotonic time just before
        #: the statement went out): the database's term runs from a moment after it.
        self._renewed: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def take(self, name: str) -> bool:
        """Take the lease ``name``; ``False`` if another process holds it, or another thread of
        this one (a lease is one piece of work, done once at a time)."""
        with self._lock:
            if self._stopped.is_set() or name in self._held or name in self._taking:
                return False  # a stopping process takes no new work
            self._taking.add(name)  # before the database, so that two threads here cannot both take it
        now, sent = self.clock.now(), self.clock.monotonic()
        try:
            taken = self.store.take_lease(name, self.owner, now, now + timedelta(seconds=self.seconds))
        except BaseException:
            self._forget(name)
            raise
        if not taken:
            self._forget(name)
            return False
        with self._lock:
            self._taking.discard(name)
            self._held.add(name)
            self._renewed[name] = sent
            if self._heartbeat is None and not self._stopped.is_set():
                self._heartbeat = threading.Thread(target=self._renew_while_held, name="iotreg-leases", daemon=True)
                self._heartbeat.start()
        return True

    def release(self, name: str) -> None:
        """Give the lease back: in the database first, so that no thread here takes it again
        before the row is gone (its delete would take the new holder's row with it)."""
        with self._lock:
            self._held.discard(name)
            self._taking.add(name)
        try:
            self.store.release_lease(name, self.owner)
        except StoreUnavailable as exc:  # it runs out by itself
            log.warning("could not give back lease %s: %s", name, exc)
        finally:
            self._forget(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._held.discard(name)
            self._taking.discard(name)
            self._renewed.pop(name, None)

    def fresh(self, name: str) -> bool:
        """Whether this process surely still holds ``name``: renewed within two thirds of a term.

        A lease whose renewals failed (the database out of reach from here, a pool starved) may
        have run out and been taken by another process: work that must not happen twice (a
        register call) asks this right before it goes out, and does not go when it is ``False``.
        """
        with self._lock:
            renewed = self._renewed.get(name)
        return renewed is not None and self.clock.monotonic() - renewed < self.seconds * 2 / 3

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def renew(self) -> int:
        """Extend every lease this process holds; returns how many the database has."""
        held = self.held()
        if not held:
            return 0
        sent = self.clock.monotonic()
        renewed = self.store.renew_leases(self.owner, self.clock.now() + timedelta(seconds=self.seconds))
        with self._lock:
            # Held before and after the renewal, and not in the database: run out (and maybe
            # taken). Those do not count as renewed, so their work does nothing that must not
            # happen twice (see fresh()). A lease given back meanwhile is simply gone.
            lost = (held & self._held) - renewed
            for name in renewed & self._held:
                self._renewed[name] = sent
        if lost:
            log.warning(
                "%d lease(s) ran out before they were renewed; their work may run elsewhere too: %s", len(lost), ", ".join(sorted(lost))
            )
        return len(renewed)

    def hand_back(self) -> int:
        """Stop renewing and give back every lease at once (a process stopping); returns how many."""
        self._stopped.set()
        with self._lock:
            self._held.clear()
            self._renewed.clear()  # a step still running sends nothing more that must not go twice
            heartbeat = self._heartbeat
        if heartbeat is not None and heartbeat is not threading.current_thread():
            # A renewal under way ends first: the store may be closed right after this (a
            # connection closed under a statement can take the process down).
            heartbeat.join(RENEWAL_WAIT)
            if heartbeat.is_alive():
                log.warning("a lease renewal still had not ended after %g s; giving the leases back all the same", RENEWAL_WAIT)
        try:
            count = self.store.release_leases(self.owner)
        except StoreUnavailable as exc:
            log.warning("could not hand back leases: %s (they run out within %g s)", exc, self.seconds)
            return 0
        if count:
            log.info("handed back %d lease(s)", count)
        return count

    def _renew_while_held(self) -> None:
        while not self._stopped.wait(self.seconds / 3):
            try:
                self.renew()
            except StoreUnavailable as exc:
                log.warning("could not renew leases: %s", exc)
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                log.exception("renewing leases failed")
