"""The workflow's events, told in Slack: one anchor message per request, kept current, and the rest
in its thread.

Events come from the store's outbox, in order per request. If Slack fails (after slack-sdk's own
retries for 429 and 5xx), :meth:`SlackNotifier.deliver` raises and the outbox sends the event again
later, so a result is never lost. Each step checks what was already done (the anchor's ``ts`` is
stored), so a repeated event updates rather than posts again.

Exactly once, across a crash. The outbox is at-least-once: a step is recorded as done
(``mark_step``) only after Slack took its message, so a crash (SIGKILL, power loss) between Slack's
answer and that record would post the message again when the event is delivered again. Slack's
``chat.postMessage`` has no idempotency key, and the crash loses exactly what would identify the
post (its ``ts``), so keeping the ``ts`` cannot close the window. What is done instead:

* every post is first recorded as *begun* (``RequestService.begin_step``, a store write), and
  carries message metadata (``event_type`` :data:`STEP_EVENT_TYPE`, ``event_payload``: the event's
  id and the post's key, plus the bot's label when several bots share a workspace);
* a redelivery that finds a post begun but not done looks for its own message first: in the
  request's thread with ``conversations.replies``, elsewhere (the anchor, the team's channel, DMs)
  with ``conversations.history``, both with ``include_all_metadata``, over at most
  :data:`LOOKUP_PAGES` pages of :data:`LOOKUP_PAGE` messages (the newest for ``history``), and posts
  only if none is there. A first delivery never looks, so the normal path costs one store write.
* Files (the outcomes CSV) cannot carry metadata, but they need no history scope either:
  files_upload_v2's three steps are made one by one, and the file's id is kept (in the request's
  ``origin_data["files"]``) before ``files.completeUploadExternal`` shares it. A redelivery asks
  ``files.info`` whether that file is shared in the channel (and thread) already. What remains:
  Slack may share a completed upload asynchronously, so a redelivery within moments of the crash
  could see no share yet and upload again; and a crash between the upload URL and keeping the
  file's id leaves an unshared upload behind (invisible to people, never a duplicate).

Reading history needs the ``channels:history``, ``groups:history``, ``im:history`` and
``mpim:history`` scopes (the request's channel may be any kind of conversation). No design without
them was found: the alternatives (an anchor's ``latest_reply``, chat.scheduleMessage ids, a
placeholder updated later) either need the same scopes or lose their handle in the same window.
When a lookup fails anyway (an installation without the new scopes, ``not_in_channel``, Slack's
documented caveat about bot tokens and ``conversations.replies`` in channels), the post goes out
as before, at least once, with a warning in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import requests

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import report
from bot.domain import SYSTEM, Event, EventKind, Outcome, Request, State, WorkflowError
from bot.policy import Announcement, announcements
from bot.service import RequestService
from bot.slack import blocks
from bot.slack.approvers import Approvers

log = logging.getLogger(__name__)

#: The metadata ``event_type`` of every message the notifier posts (how a redelivery finds it).
STEP_EVENT_TYPE = "iotreg_step"
#: A lookup reads at most this many pages of this many messages.
LOOKUP_PAGES = 5
LOOKUP_PAGE = 200


@dataclasses.dataclass(frozen=True)
class Mark:
    """One post of one event's delivery: what its begun mark and its message metadata are keyed by."""

    event_id: int
    key: str

    def sub(self, part: str) -> Mark:
        """The mark of one of several posts of a step (each approver's DM, a message and its file)."""
        return Mark(self.event_id, f"{self.key}/{part}")


class SlackNotifier:
    def __init__(
        self,
        client: WebClient,
        approvers: Approvers,
        requests: RequestService,
        *,
        notify_channel: str | None = None,
        credentials_dm: bool = True,
        label: str = "",
    ) -> None:
        self.client = client
        self.approvers = approvers
        self.notify_channel = notify_channel
        self.credentials_dm = credentials_dm
        self.label = label
        self.requests = requests

    def deliver(self, event: Event) -> None:
        """Carry out the event's announcements not done yet; each is recorded once it is."""
        request = self.requests.get(event.request_id)
        if request is None or not request.channel:
            return
        if request.origin_data.get("error"):
            if event.kind is EventKind.FINISHED:
                self._once(event, "dm_result", lambda mark: self._dm_result(request, mark))
            return
        progress = None
        if event.kind is EventKind.PROGRESS:
            progress = (event.payload.get("chunks_done", 0), event.payload.get("chunks", 0))
        steps: dict[Announcement, Callable[[Mark], None]] = {
            Announcement.MESSAGE: lambda mark: self._update_anchor(request, mark, progress=progress, as_of=event.kind),
            Announcement.READ_AS: lambda mark: self._reply(request, mark, *blocks.read_as_reply(str(event.payload.get("read_as")))),
            Announcement.SKIPPED_LINES: lambda mark: self._reply(
                request, mark, *blocks.rejected_lines_reply(self.requests.rejected_lines(request.id), request.rejected_count)
            ),
            Announcement.CHECK_FAILED: lambda mark: self._reply(request, mark, *check_failed_content(self.requests, request)),
            Announcement.RESULT: lambda mark: self._reply(request, mark, *self._result_reply(request)),
            Announcement.RESULT_FILE: lambda mark: self._post_result_file(request, mark),
            Announcement.NOTICE: lambda mark: self._notice(request, mark),
            Announcement.ASK_APPROVERS: lambda mark: self._ask_approvers(request, event, mark),
            Announcement.APPROVER_COPIES: lambda _mark: self._update_copies(request, event),
            Announcement.REMIND: lambda _mark: self._remind(request, event),
            Announcement.EXPIRY: lambda _mark: self._expired(request, event),
        }
        for announcement in announcements(event, request):
            try:
                self._once(event, announcement.value, steps[announcement])
            except _ChannelUnusable as exc:
                self._give_up_on_channel(request, exc.error)
                return

    def _once(self, event: Event, name: str, step: Callable[[Mark], None]) -> None:
        if self.requests.step_done(event.id, name):
            return
        step(Mark(event.id, name))
        self.requests.mark_step(event.id, name)

    # -- posting once -----------------------------------------------------------------------------

    def _post(self, mark: Mark, *, channel: str, thread_ts: str | None = None, **message: Any) -> tuple[str, str]:
        """chat.postMessage with the mark's metadata, unless an earlier attempt's message is there
        already; ``(channel, ts)`` of the message either way."""
        if self.requests.begin_step(mark.event_id, mark.key) is not None:
            found = self._find(mark, channel, thread_ts)
            if found is not None:
                log.info("event %d: %s was posted before a restart (%s); not posting it again", mark.event_id, mark.key, found[1])
                return found
        metadata = {"event_type": STEP_EVENT_TYPE, "event_payload": self._payload(mark)}
        posted = self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, metadata=metadata, **message)
        return posted["channel"], posted["ts"]

    def _payload(self, mark: Mark) -> dict[str, Any]:
        payload: dict[str, Any] = {"event_id": mark.event_id, "step": mark.key}
        if self.label:
            payload["label"] = self.label
        return payload

    def _find(self, mark: Mark, channel: str, thread_ts: str | None) -> tuple[str, str] | None:
        """The message an earlier attempt posted for ``mark`` in the thread (or channel), if any."""
        wanted = {"event_type": STEP_EVENT_TYPE, "event_payload": self._payload(mark)}
        try:
            for message in self._recent(channel, thread_ts):
                if message.get("metadata") == wanted:
                    return channel, message["ts"]
        except SlackApiError as exc:
            log.warning(
                "event %d: cannot look for an earlier post of %s in %s (%s); posting it, perhaps a second time",
                mark.event_id, mark.key, channel, exc.response.get("error"),
            )
        return None

    def _recent(self, channel: str, thread_ts: str | None) -> Iterator[dict[str, Any]]:
        """The thread's messages oldest first, or the channel's newest first, up to the lookup's bound."""
        cursor = None
        for _ in range(LOOKUP_PAGES):
            if thread_ts:
                page = self.client.conversations_replies(
                    channel=channel, ts=thread_ts, include_all_metadata=True, limit=LOOKUP_PAGE, cursor=cursor
                )
            else:
                page = self.client.conversations_history(channel=channel, include_all_metadata=True, limit=LOOKUP_PAGE, cursor=cursor)
            yield from page.get("messages") or []
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return

    def _upload(self, request: Request, mark: Mark, *, channel: str, thread_ts: str | None, content: bytes, filename: str, title: str) -> None:
        """files_upload_v2's three steps one by one, the file's id kept before it is shared, so a
        redelivery can ask ``files.info`` whether the share happened instead of uploading again."""
        files = self.requests.require(request.id).origin_data.get("files") or {}
        kept = files.get(f"{mark.event_id}:{mark.key}")
        if self.requests.begin_step(mark.event_id, mark.key) is not None and kept and self._shared(kept, channel, thread_ts):
            log.info("event %d: %s was shared before a restart; not uploading it again", mark.event_id, mark.key)
            return
        target = self.client.files_getUploadURLExternal(filename=filename, length=len(content))
        files = dict(self.requests.require(request.id).origin_data.get("files") or {})
        files[f"{mark.event_id}:{mark.key}"] = target["file_id"]
        self.requests.set_origin_data(request.id, files=files)
        sent = requests.post(target["upload_url"], data=content, timeout=self.client.timeout, proxies=_proxies(self.client.proxy))
        if sent.status_code != 200:
            raise UploadFailed(f"the upload of {filename} was answered with HTTP {sent.status_code}")
        self.client.files_completeUploadExternal(files=[{"id": target["file_id"], "title": title}], channel_id=channel, thread_ts=thread_ts)

    def _shared(self, file_id: str, channel: str, thread_ts: str | None) -> bool:
        """Whether the file is shared in ``channel`` (in the thread ``thread_ts``, if given)."""
        try:
            file = self.client.files_info(file=file_id)["file"]
        except SlackApiError as exc:
            if exc.response.get("error") not in ("file_not_found", "file_deleted"):
                raise
            return False
        shares = [s for kind in (file.get("shares") or {}).values() for s in (kind.get(channel) or [])]
        return any(thread_ts is None or s.get("thread_ts") == thread_ts for s in shares)

    # -- steps ------------------------------------------------------------------------------------

    def _update_anchor(
        self, request: Request, mark: Mark, progress: tuple[int, int] | None = None, as_of: EventKind | None = None
    ) -> None:
        """Post the anchor the first time, update it after (and post it again if it was deleted).

        It shows the request as it stands, except that the approval is shown as such even when
        registering has begun by the time it is delivered (the next event shows that): each step
        gets its edit, in order, whichever process or thread was quicker.
        """
        request = self.requests.get(request.id) or request
        if as_of is EventKind.APPROVED and request.state == State.REGISTERING:
            request = dataclasses.replace(request, state=State.APPROVED)
        text, content = self._content(request, progress)
        thread_ts = request.origin_data.get("thread_ts")
        if thread_ts:
            try:
                self.client.chat_update(channel=request.channel, ts=thread_ts, text=text, blocks=content)
                return
            except SlackApiError as exc:
                if exc.response.get("error") not in ("message_not_found", "cant_update_message"):
                    raise
                log.warning("request #%d: its message is gone (%s); posting it again", request.id, exc.response.get("error"))
        try:
            channel, ts = self._post(mark, channel=request.channel, text=text, blocks=content)
        except SlackApiError as exc:
            if exc.response.get("error") in UNUSABLE_CHANNEL:
                raise _ChannelUnusable(exc.response.get("error")) from exc
            raise
        self.requests.move_channel(request.id, channel)
        self.requests.set_origin_data(request.id, thread_ts=ts)

    def _content(self, request: Request, progress: tuple[int, int] | None = None) -> tuple[str, blocks.Blocks]:
        """The request's message as it stands: in its channel, and in each approver's copy."""
        rule = self.requests.rule_of(request)
        return blocks.anchor(
            request,
            self.requests.summary(request.id),
            approvers=self.approvers.of(rule.approvers).describe(),
            progress=progress,
            credentials_button=self.credentials_dm,
            label=self.label,
            approvals=self.requests.approvals(request.id),
            needed=rule.approvals,
        )

    def _copy(self, request: Request) -> tuple[str, blocks.Blocks]:
        """An approver's copy: who asks, then the request's message with the same buttons."""
        text, content = self._content(request)
        intro = blocks.approver_intro(request, self.requests.rule_of(request).approvals)
        return f"{intro} {text}", [blocks.section(intro), *content]

    def _ask_approvers(self, request: Request, event: Event, mark: Mark) -> None:
        """Send each approver the request needs a copy with the buttons (members of user groups too,
        up to :data:`~bot.slack.approvers.MAX_GROUP_DMS`; a bigger group is mentioned in the thread).
        Each copy is kept in ``origin_data["dms"]`` as it is posted, so a redelivery sends none twice."""
        rule = self.requests.rule_of(request)
        members = self.approvers.of(rule.approvers)
        if members.anyone:
            return
        users, groups = members.people()
        for person in users:
            if person == request.requester and not rule.self_approval:
                continue
            if person in (self.requests.require(request.id).origin_data.get("dms") or {}):
                continue
            try:
                dm = self.client.conversations_open(users=person)["channel"]["id"]
            except SlackApiError as exc:
                if exc.response.get("error") not in UNREACHABLE_USER:
                    raise
                log.warning("request #%d: cannot message approver %s (%s)", request.id, person, exc.response.get("error"))
                self.requests.record(request.id, SYSTEM, "approver_unreachable", {"approver": person, "error": exc.response.get("error")})
                continue
            text, content = self._copy(self.requests.require(request.id))
            channel, ts = self._post(mark.sub(person), channel=dm, text=text, blocks=content)
            dms = dict(self.requests.require(request.id).origin_data.get("dms") or {})
            dms[person] = [channel, ts]
            self.requests.set_origin_data(request.id, dms=dms)
        if groups:
            self._once(event, "mention_groups", lambda mark: self._reply(request, mark, blocks.groups_mention(groups), [blocks.section(blocks.groups_mention(groups))]))

    def _update_copies(self, request: Request, event: Event) -> None:
        """Bring every approver's copy up to date, each once for this event."""
        request = self.requests.require(request.id)
        for person, (channel, ts) in (request.origin_data.get("dms") or {}).items():
            def update(_mark: Mark, channel: str = channel, ts: str = ts) -> None:
                text, content = self._copy(self.requests.require(request.id))
                try:
                    self.client.chat_update(channel=channel, ts=ts, text=text, blocks=content)
                except SlackApiError as exc:
                    if exc.response.get("error") not in ("message_not_found", "cant_update_message", "channel_not_found"):
                        raise
                    log.warning("request #%d: the copy sent to %s is gone", request.id, person)
            self._once(event, f"copy:{person}", update)

    def _remind(self, request: Request, event: Event) -> None:
        """Remind the approvers who have not acted (by DM; in the thread when nobody was sent one)."""
        request = self.requests.require(request.id)
        if request.state != State.AWAITING_APPROVAL:
            return
        approvals = self.requests.approvals(request.id)
        text = blocks.reminder_text(request, approvals, self.requests.rule_of(request).approvals)
        dms = request.origin_data.get("dms") or {}
        if not dms:
            self._once(event, "remind_thread", lambda mark: self._reply(request, mark, text, [blocks.section(text)]))
            return
        acted = {a.approver for a in approvals}
        for person, (channel, _ts) in dms.items():
            if person not in acted:
                self._once(event, f"remind:{person}", lambda mark, channel=channel: self._post(
                    mark, channel=channel, text=text, blocks=[blocks.section(text)],
                ))

    def _expired(self, request: Request, event: Event) -> None:
        """Nobody approved in time: say so in the thread and to the requester."""
        request = self.requests.require(request.id)
        text = blocks.expired_text(request)
        self._once(event, "expiry_thread", lambda mark: self._reply(request, mark, text, [blocks.section(text)]))
        self._once(event, "expiry_dm", lambda mark: self._post(mark, channel=self._dm(request.requester), text=text))

    def _reply(self, request: Request, mark: Mark, text: str, content: blocks.Blocks) -> None:
        thread_ts = self.requests.require(request.id).origin_data.get("thread_ts")  # set by the anchor just before
        if self.label:
            content = [blocks.context(self.label), *content]
        self._post(mark, channel=request.channel, thread_ts=thread_ts, text=text, blocks=content)

    def _dm(self, user: str) -> str:
        return self.client.conversations_open(users=user)["channel"]["id"]

    def _result_reply(self, request: Request) -> tuple[str, blocks.Blocks]:
        store = self.requests
        summary = store.summary(request.id)
        failed = store.devices(request.id, outcome=Outcome.NOT_CREATED, limit=blocks.INLINE_DEVICES)
        if len(failed) < blocks.INLINE_DEVICES and request.final:
            failed += store.devices(request.id, outcome=Outcome.PENDING, limit=blocks.INLINE_DEVICES - len(failed))
        with_file = self._with_file(request)
        created = [] if with_file else store.devices(request.id, outcome=Outcome.CREATED)
        return blocks.result_reply(summary, failed, created, with_file=with_file)

    def _with_file(self, request: Request) -> bool:
        summary = self.requests.summary(request.id)
        return summary.total + summary.rejected_locally > blocks.INLINE_DEVICES

    def _post_result_file(self, request: Request, mark: Mark, channel: str | None = None, thread_ts: str | None = None) -> None:
        if not self._with_file(request):
            return
        if channel is None:
            channel, thread_ts = request.channel, self.requests.require(request.id).origin_data.get("thread_ts")
        self._upload(
            request,
            mark,
            channel=channel,
            thread_ts=thread_ts,
            content=report.outcomes_csv(self.requests, request.id).encode("utf-8"),
            filename=f"registration-{request.id}-{request.product_key}.csv",
            title=f"Device registration #{request.id}: every device's outcome",
        )

    def _notice(self, request: Request, mark: Mark) -> None:
        """The one-line notice in the team's channel: worth a try, never worth holding the result back."""
        if not self.notify_channel:
            return
        text = (f"{self.label} " if self.label else "") + blocks.notice(self.requests.summary(request.id))
        try:
            self._post(mark, channel=self.notify_channel, text=text)
        except SlackApiError as exc:
            error = exc.response.get("error")
            if error not in UNUSABLE_CHANNEL:
                raise
            log.warning("no notice in %s: %s (invite the bot to that channel)", self.notify_channel, error)
            self.requests.record(request.id, SYSTEM, "notice_failed", {"channel": self.notify_channel, "error": error})

    def _give_up_on_channel(self, request: Request, error: str) -> None:
        """The request's channel cannot take the bot's messages: tell the requester, stop the request."""
        self.requests.set_origin_data(request.id, error=error)
        self.requests.record(request.id, SYSTEM, "slack_channel_unusable", {"error": error})
        stopped = ""
        try:
            self.requests.stop(request.id, SYSTEM)
            stopped = " The request was cancelled; nothing was registered."
        except WorkflowError:
            stopped = " Its result will come to you here."
        self.client.chat_postMessage(
            channel=self._dm(request.requester),
            text=(
                f"I could not post device registration #{request.id} in {blocks.channel(request.channel)} (Slack said {blocks.escape(error, code=True, limit=100)}). "
                f"Invite me there with `/invite @iotreg`, or use a channel I am in, and run `{blocks.COMMAND}` again.{stopped}"
            ),
        )

    def _dm_result(self, request: Request, mark: Mark) -> None:
        text, content = self._result_reply(request)
        dm, ts = self._post(mark.sub("message"), channel=self._dm(request.requester), text=text, blocks=content)
        self._post_result_file(request, mark.sub("file"), channel=dm, thread_ts=ts)


def check_failed_content(requests: RequestService, request: Request, *, retried_by: str | None = None) -> tuple[str, blocks.Blocks]:
    """The reply that lists the names the check refused, with the retry button or the retry's number."""
    summary = requests.summary(request.id)
    invalid = requests.devices(request.id, outcome=Outcome.INVALID, limit=blocks.INLINE_DEVICES)
    return blocks.check_failed_reply(request, invalid, summary.invalid, request.count - summary.invalid, retried_by=retried_by)


#: Errors that say the request's channel will not take the bot's messages, however often it tries.
UNUSABLE_CHANNEL = frozenset({"channel_not_found", "not_in_channel", "is_archived", "restricted_action", "no_permission"})


#: Errors that say an approver cannot be sent a direct message at all.
UNREACHABLE_USER = frozenset({"user_not_found", "user_disabled", "cannot_dm_bot", "not_allowed_token_type"})


class UploadFailed(Exception):
    """The upload URL refused the file's bytes; the event is delivered again later."""


def _proxies(proxy: str | None) -> dict[str, str] | None:
    return {"http": proxy, "https": proxy} if proxy else None


class _ChannelUnusable(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error
