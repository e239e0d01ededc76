"""The workflow's events, told in Slack: one anchor message per request, kept current, and the rest
in its thread.

Events come from the store's outbox, in order per request. If Slack fails (after slack-sdk's own
retries for 429 and 5xx), :meth:`SlackNotifier.deliver` raises and the outbox sends the event again
later, so a result is never lost. Each step checks what was already done (the anchor's ``ts`` is
stored), so a repeated event updates rather than posts again.
"""

from __future__ import annotations

import logging

from slack_sdk import WebClient

from bot import report
from bot import store as st
from bot.registration import Workflow
from bot.slack import blocks
from bot.slack.approvers import Approvers
from bot.store import Event, Request

log = logging.getLogger(__name__)


class SlackNotifier:
    def __init__(
        self,
        client: WebClient,
        approvers: Approvers,
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
        self.workflow: Workflow | None = None

    def bind(self, workflow: Workflow) -> None:
        self.workflow = workflow

    def deliver(self, event: Event) -> None:
        assert self.workflow is not None, "bind() the workflow first"
        request = self.workflow.get(event.request_id)
        if request is None or not request.channel:
            return
        if event.kind == "created":
            self._update_anchor(request)
            if request.rejected_count:
                self._reply(request, *blocks.rejected_lines_reply(self.workflow.store.rejected_lines(request.id), request.rejected_count))
        elif event.kind == "check_failed":
            self._update_anchor(request)
            summary = self.workflow.summary(request.id)
            invalid = self.workflow.store.devices(request.id, outcome=st.INVALID, limit=blocks.INLINE_DEVICES)
            self._reply(request, *blocks.check_failed_reply(request, invalid, summary.invalid, request.count - summary.invalid))
        elif event.kind == "progress":
            self._update_anchor(request, progress=(event.payload.get("chunks_done", 0), event.payload.get("chunks", 0)))
        elif event.kind == "finished":
            self._update_anchor(request)
            self._post_result(request)
        else:  # awaiting_approval, approved, rejected, cancelled, expired, registering
            self._update_anchor(request)

    # -- steps ------------------------------------------------------------------------------------

    def _update_anchor(self, request: Request, progress: tuple[int, int] | None = None) -> None:
        """Post the anchor the first time, update it after."""
        assert self.workflow is not None
        text, content = blocks.anchor(
            request,
            self.workflow.summary(request.id),
            approvers=self.approvers.describe(),
            progress=progress,
            credentials_button=self.credentials_dm,
            label=self.label,
        )
        if request.thread_ts:
            self.client.chat_update(channel=request.channel, ts=request.thread_ts, text=text, blocks=content)
            return
        posted = self.client.chat_postMessage(channel=request.channel, text=text, blocks=content)
        self.workflow.store.update_request(request.id, thread_ts=posted["ts"], channel=posted["channel"])

    def _reply(self, request: Request, text: str, content: blocks.Blocks, *, broadcast: bool = False) -> None:
        assert self.workflow is not None
        thread_ts = self.workflow.get(request.id).thread_ts  # set by the anchor just before
        if self.label:
            content = [blocks.context(self.label), *content]
        self.client.chat_postMessage(channel=request.channel, thread_ts=thread_ts, text=text, blocks=content, reply_broadcast=broadcast)

    def _post_result(self, request: Request) -> None:
        assert self.workflow is not None
        store = self.workflow.store
        summary = self.workflow.summary(request.id)
        total = summary.total + summary.rejected_locally
        with_file = total > blocks.INLINE_DEVICES
        failed = store.devices(request.id, outcome=st.NOT_CREATED, limit=blocks.INLINE_DEVICES)
        if len(failed) < blocks.INLINE_DEVICES and request.final:
            failed += store.devices(request.id, outcome=st.PENDING, limit=blocks.INLINE_DEVICES - len(failed))
        created = [] if with_file else store.devices(request.id, outcome=st.CREATED)
        self._reply(request, *blocks.result_reply(summary, failed, created, with_file=with_file))
        if with_file:
            thread_ts = self.workflow.get(request.id).thread_ts
            self.client.files_upload_v2(
                channel=request.channel,
                thread_ts=thread_ts,
                content=report.outcomes_csv(store, request.id),
                filename=f"registration-{request.id}-{request.product_key}.csv",
                title=f"Device registration #{request.id}: every device's outcome",
            )
        if self.notify_channel:
            self.client.chat_postMessage(channel=self.notify_channel, text=(f"{self.label} " if self.label else "") + blocks.notice(summary))
