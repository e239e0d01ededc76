"""Who may approve, checked on the server at every click.

``IOTREG_APPROVERS`` lists user ids (``U…``) and user group ids (``S…``); groups are resolved with
``usergroups.users.list`` and cached for a few minutes (a Tier 2 method). An empty list means anyone
may approve. Either way the requester may not approve their own request unless
``IOTREG_ALLOW_SELF_APPROVAL`` is set: that rule lives in the workflow, so every front end obeys it.
If a group cannot be resolved the check fails closed: nobody is let in on a guess.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.clock import Clock
from bot.domain import Request

log = logging.getLogger(__name__)

GROUP_CACHE_SECONDS = 300.0


class NeedsSlack(Exception):
    """Whether a user may approve depends on a user group that is not cached."""


#: The most members of one user group who are sent a request directly; a bigger group is mentioned.
MAX_GROUP_DMS = 20


class Approvers:
    def __init__(
        self, client: WebClient, ids: Sequence[str], clock: Clock, *, cache_seconds: float = GROUP_CACHE_SECONDS,
        shared: Approvers | None = None,
    ) -> None:
        """``shared``: another list whose user-group cache this one uses too."""
        self.client = client
        self.users = frozenset(i for i in ids if i[0] in "UW")
        self.groups = tuple(i for i in ids if i[0] == "S")
        self.clock = clock
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, frozenset[str]]] = shared._cache if shared else {}
        self._lock = shared._lock if shared else threading.Lock()
        self._lists: dict[tuple[str, ...], Approvers] = {}

    def of(self, ids: Sequence[str]) -> Approvers:
        """The approvers named by ``ids`` (a product's rule), sharing this list's group cache."""
        key = tuple(ids)
        with self._lock:
            found = self._lists.get(key)
        if found is None:
            found = Approvers(self.client, key, self.clock, cache_seconds=self.cache_seconds, shared=self)
            with self._lock:
                found = self._lists.setdefault(key, found)
        return found

    def people(self) -> tuple[list[str], list[str]]:
        """Who to tell about a request: the user ids (named ones, and members of groups of at most
        :data:`MAX_GROUP_DMS`), and the groups too big (or unreadable) to message one by one."""
        users = set(self.users)
        mentioned = []
        for group in self.groups:
            try:
                members = self._members(group)
            except SlackApiError as exc:
                log.warning("could not resolve approver group %s: %s", group, exc.response.get("error"))
                mentioned.append(group)
                continue
            if len(members) > MAX_GROUP_DMS:
                mentioned.append(group)
            else:
                users |= members
        return sorted(users), mentioned

    @property
    def anyone(self) -> bool:
        return not self.users and not self.groups

    def describe(self) -> str:
        """The approvers, as mentions (empty when anyone may approve)."""
        return ", ".join([f"<@{u}>" for u in sorted(self.users)] + [f"<!subteam^{g}>" for g in self.groups])

    def why_not(self, user_id: str, *, ask_slack: bool = True) -> str | None:
        """``None`` if ``user_id`` may approve; otherwise the reason, to tell them.

        With ``ask_slack`` false, raise :class:`NeedsSlack` rather than look up a group not cached.
        """
        if self.anyone or user_id in self.users:
            return None
        for group in self.groups:
            try:
                if user_id in self._members(group, ask_slack):
                    return None
            except SlackApiError as exc:
                log.warning("could not resolve approver group %s: %s", group, exc.response.get("error"))
                return f"I could not check the approver group right now ({exc.response.get('error')}); try again in a minute."
        return f"You are not one of the approvers for device registrations ({self.describe()})."

    def may_see(self, user_id: str, request: Request) -> bool:
        """The requester, whoever decided, and the approvers: who may receive device credentials."""
        if user_id in (request.requester, request.decided_by):
            return True
        return not self.anyone and self.why_not(user_id) is None

    def _members(self, group: str, ask_slack: bool = True) -> frozenset[str]:
        now = self.clock.monotonic()
        with self._lock:
            cached = self._cache.get(group)
            if cached and now - cached[0] < self.cache_seconds:
                return cached[1]
        if not ask_slack:
            raise NeedsSlack(group)
        members = frozenset(self.client.usergroups_users_list(usergroup=group)["users"])
        with self._lock:
            self._cache[group] = (now, members)
        return members
