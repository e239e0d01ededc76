"""The workflow's events, told in Slack: one anchor message per request, kept current, and the rest
in its thread.

Events come from the store's outbox, in order per request. If Slack fails (after slack-sdk's own
retries for 429 and 5xx), :meth:`SlackNotifier.deliver` raises and the outbox sends the event again
later, so a result is never lost. Each step checks what was already done (the anchor's ``ts`` is
stored), so a repeated event updates rather than posts again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import report
from bot.domain import SYSTEM, Event, EventKind, Outcome, Request, State, WorkflowError
from bot.policy import Announcement, announcements
from bot.service import RequestService
from bot.slack import blocks
from bot.slack.approvers import Approvers

log = logging.getLogger(__name__)


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
                self._once(event, "dm_result", lambda: self._dm_result(request))
            return
        progress = None
        if event.kind is EventKind.PROGRESS:
            progress = (event.payload.get("chunks_done", 0), event.payload.get("chunks", 0))
        steps: dict[Announcement, Callable[[], None]] = {
            Announcement.MESSAGE: lambda: self._update_anchor(request, progress=progress),
            Announcement.READ_AS: lambda: self._reply(request, *blocks.read_as_reply(str(event.payload.get("read_as")))),
            Announcement.SKIPPED_LINES: lambda: self._reply(
                request, *blocks.rejected_lines_reply(self.requests.rejected_lines(request.id), request.rejected_count)
            ),
            Announcement.CHECK_FAILED: lambda: self._check_failed(request),
            Announcement.RESULT: lambda: self._post_result(request),
            Announcement.RESULT_FILE: lambda: self._post_result_file(request),
            Announcement.NOTICE: lambda: self._notice(request),
            Announcement.ASK_APPROVERS: lambda: self._ask_approvers(request, event),
            Announcement.APPROVER_COPIES: lambda: self._update_copies(request, event),
            Announcement.REMIND: lambda: self._remind(request, event),
            Announcement.EXPIRY: lambda: self._expired(request, event),
        }
        for announcement in announcements(event, request):
            try:
                self._once(event, announcement.value, steps[announcement])
            except _ChannelUnusable as exc:
                self._give_up_on_channel(request, exc.error)
                return

    def _once(self, event: Event, name: str, step: Callable[[], None]) -> None:
        if self.requests.step_done(event.id, name):
            return
        step()
        self.requests.mark_step(event.id, name)

    # -- steps ------------------------------------------------------------------------------------

    def _update_anchor(self, request: Request, progress: tuple[int, int] | None = None) -> None:
        """Post the anchor the first time, update it after (and post it again if it was deleted)."""
        request = self.requests.get(request.id) or request
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
            posted = self.client.chat_postMessage(channel=request.channel, text=text, blocks=content)
        except SlackApiError as exc:
            if exc.response.get("error") in UNUSABLE_CHANNEL:
                raise _ChannelUnusable(exc.response.get("error")) from exc
            raise
        self.requests.move_channel(request.id, posted["channel"])
        self.requests.set_origin_data(request.id, thread_ts=posted["ts"])

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

    def _ask_approvers(self, request: Request, event: Event) -> None:
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
            posted = self.client.chat_postMessage(channel=dm, text=text, blocks=content)
            dms = dict(self.requests.require(request.id).origin_data.get("dms") or {})
            dms[person] = [posted["channel"], posted["ts"]]
            self.requests.set_origin_data(request.id, dms=dms)
        if groups:
            self._once(event, "mention_groups", lambda: self._reply(request, blocks.groups_mention(groups), [blocks.section(blocks.groups_mention(groups))]))

    def _update_copies(self, request: Request, event: Event) -> None:
        """Bring every approver's copy up to date, each once for this event."""
        request = self.requests.require(request.id)
        for person, (channel, ts) in (request.origin_data.get("dms") or {}).items():
            def update(channel: str = channel, ts: str = ts) -> None:
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
            self._once(event, "remind_thread", lambda: self._reply(request, text, [blocks.section(text)]))
            return
        acted = {a.approver for a in approvals}
        for person, (channel, _ts) in dms.items():
            if person not in acted:
                self._once(event, f"remind:{person}", lambda channel=channel: self.client.chat_postMessage(
                    channel=channel, text=text, blocks=[blocks.section(text)],
                ))

    def _expired(self, request: Request, event: Event) -> None:
        """Nobody approved in time: say so in the thread and to the requester."""
        request = self.requests.require(request.id)
        text = blocks.expired_text(request)
        self._once(event, "expiry_thread", lambda: self._reply(request, text, [blocks.section(text)]))
        self._once(event, "expiry_dm", lambda: self.client.chat_postMessage(
            channel=self.client.conversations_open(users=request.requester)["channel"]["id"], text=text,
        ))

    def _reply(self, request: Request, text: str, content: blocks.Blocks, *, broadcast: bool = False) -> None:
        thread_ts = self.requests.require(request.id).origin_data.get("thread_ts")  # set by the anchor just before
        if self.label:
            content = [blocks.context(self.label), *content]
        self.client.chat_postMessage(channel=request.channel, thread_ts=thread_ts, text=text, blocks=content, reply_broadcast=broadcast)

    def _check_failed(self, request: Request) -> None:
        self._reply(request, *check_failed_content(self.requests, request))

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

    def _post_result(self, request: Request) -> None:
        self._reply(request, *self._result_reply(request))

    def _post_result_file(self, request: Request, channel: str | None = None, thread_ts: str | None = None) -> None:
        if not self._with_file(request):
            return
        if channel is None:
            channel, thread_ts = request.channel, self.requests.require(request.id).origin_data.get("thread_ts")
        self.client.files_upload_v2(
            channel=channel,
            thread_ts=thread_ts,
            content=report.outcomes_csv(self.requests, request.id),
            filename=f"registration-{request.id}-{request.product_key}.csv",
            title=f"Device registration #{request.id}: every device's outcome",
        )

    def _notice(self, request: Request) -> None:
        """The one-line notice in the team's channel: worth a try, never worth holding the result back."""
        if not self.notify_channel:
            return
        text = (f"{self.label} " if self.label else "") + blocks.notice(self.requests.summary(request.id))
        try:
            self.client.chat_postMessage(channel=self.notify_channel, text=text)
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
        dm = self.client.conversations_open(users=request.requester)["channel"]["id"]
        self.client.chat_postMessage(
            channel=dm,
            text=(
                f"I could not post device registration #{request.id} in {blocks.channel(request.channel)} (Slack said {blocks.escape(error, code=True, limit=100)}). "
                f"Invite me there with `/invite @iotreg`, or use a channel I am in, and run `{blocks.COMMAND}` again.{stopped}"
            ),
        )

    def _dm_result(self, request: Request) -> None:
        dm = self.client.conversations_open(users=request.requester)["channel"]["id"]
        text, content = self._result_reply(request)
        posted = self.client.chat_postMessage(channel=dm, text=text, blocks=content)
        self._post_result_file(request, channel=dm, thread_ts=posted["ts"])


def check_failed_content(requests: RequestService, request: Request, *, retried_by: str | None = None) -> tuple[str, blocks.Blocks]:
    """The reply that lists the names the check refused, with the retry button or the retry's number."""
    summary = requests.summary(request.id)
    invalid = requests.devices(request.id, outcome=Outcome.INVALID, limit=blocks.INLINE_DEVICES)
    return blocks.check_failed_reply(request, invalid, summary.invalid, request.count - summary.invalid, retried_by=retried_by)


#: Errors that say the request's channel will not take the bot's messages, however often it tries.
UNUSABLE_CHANNEL = frozenset({"channel_not_found", "not_in_channel", "is_archived", "restricted_action", "no_permission"})


#: Errors that say an approver cannot be sent a direct message at all.
UNREACHABLE_USER = frozenset({"user_not_found", "user_disabled", "cannot_dm_bot", "not_allowed_token_type"})


class _ChannelUnusable(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error
