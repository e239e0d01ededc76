"""The buttons: approve, reject, retry with the valid names, cancel, send me the credentials.

Every click is acknowledged first, then checked on the server (who clicked, whether the request
can still take it); a click that changes nothing is answered, ephemerally, with why. The buttons
act the same in the channel, in an approver's direct message and on the Home tab (whose clicks
are answered by DM, and which is then shown again as it now stands).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Iterator

from slack_bolt import Ack, App
from slack_sdk import WebClient

from bot import report
from bot.domain import Action, Conflict, NotAllowed, NotFound, Request, State, WorkflowError
from bot.slack import blocks, home
from bot.slack.commands import metadata_of
from bot.slack.deps import Deps
from bot.slack.notifier import check_failed_content
from bot.slack.views import tell

log = logging.getLogger(__name__)


def register(app: App, deps: Deps) -> None:
    def on(action_id: str, handle: Callable[[Deps, Request, str], str | None]) -> None:
        @app.action(action_id)
        def clicked(ack: Ack, body: dict, action: dict, client: WebClient) -> None:
            ack()  # the click is checked and carried out off Bolt's listener threads
            user = body["user"]["id"]
            channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")
            deps.background.submit(carry_out, deps, client, handle, action.get("value", ""), user, channel)

    on(blocks.APPROVE, approve)
    on(blocks.CANCEL, cancel)
    on(blocks.CREDENTIALS, send_credentials)

    @app.action(blocks.REJECT)
    def reject_clicked(ack: Ack, body: dict, action: dict, client: WebClient) -> None:
        """Reject opens a form for the reason (and is its confirmation): opened at once, while
        the trigger is valid; the rejection is checked and carried out when it is submitted."""
        ack()
        user = body["user"]["id"]
        channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")
        value = action.get("value", "")
        request = deps.requests.get(int(value)) if value.isdigit() and len(value) <= 18 else None
        if request is None or request.state != State.AWAITING_APPROVAL or not deps.requests.may(Action.REJECT, request, user):
            deps.background.submit(carry_out, deps, client, reject, value, user, channel)  # says why
            return
        view = blocks.reject_modal(request, deps.label)
        view["private_metadata"] = json.dumps({"request": request.id, "channel": channel or ""})
        client.views_open(trigger_id=body["trigger_id"], view=view)

    @app.view(blocks.VIEW_REJECT)
    def reject_submitted(ack: Ack, body: dict, view: dict, client: WebClient) -> None:
        ack()
        meta = metadata_of(view)
        user = body["user"]["id"]
        reason = ((((view.get("state") or {}).get("values") or {}).get(blocks.REASON_BLOCK) or {}).get(blocks.REASON_BLOCK) or {}).get("value") or ""
        handle = functools.partial(reject, reason=reason[: blocks.MAX_REASON])
        deps.background.submit(carry_out, deps, client, handle, str(meta.get("request", "")), user, meta.get("channel") or None)

    @app.action(blocks.RETRY_VALID)
    def retry_clicked(ack: Ack, body: dict, action: dict, client: WebClient) -> None:
        ack()
        user = body["user"]["id"]
        container = body.get("container") or {}
        channel = (body.get("channel") or {}).get("id") or container.get("channel_id")
        handle = functools.partial(retry_valid, client=client, channel=channel, ts=container.get("message_ts"))
        deps.background.submit(carry_out, deps, client, handle, action.get("value", ""), user, channel)


def carry_out(deps: Deps, client: WebClient, handle: Callable[[Deps, Request, str], str | None], value: str, user: str, channel: str | None) -> None:
    try:
        answer = dispatch(deps, handle, value, user)
    except Exception:  # noqa: BLE001 - this thread is an edge: the clicker must hear something
        log.exception("a button click failed")
        answer = blocks.SORRY
    if answer and channel:
        tell(client, channel, user, answer)
    elif answer:  # a click on the Home tab: answered by DM, and the tab shown as it now stands
        client.chat_postMessage(channel=user, text=answer)
    if not channel:
        home.publish(deps, client, user)


def dispatch(deps: Deps, handle: Callable[[Deps, Request, str], str | None], value: str, user: str) -> str | None:
    if not re.fullmatch(r"[0-9]{1,18}", value or ""):
        return "This button is not tied to a registration request."
    request = deps.requests.get(int(value))
    if request is None:
        return f"Request #{value} no longer exists."
    try:
        return handle(deps, request, user)
    except NotAllowed as exc:
        return blocks.refusal(exc, request)
    except Conflict as exc:
        return f"Nothing changed: {exc}."
    except (NotFound, WorkflowError) as exc:
        return str(exc)


def approve(deps: Deps, request: Request, user: str) -> str | None:
    request = deps.requests.approve(request.id, user)
    if request.state != State.AWAITING_APPROVAL and request.decided_by == user:
        return None  # this click completed the approval: the request's message says so
    # Counted, and the request still waits, or another approver completed it a moment later.
    approvals = deps.requests.approvals(request.id)
    return f"Your approval of request #{request.id} is counted: {blocks.progress_line(approvals, deps.requests.rule_of(request).approvals)}."


def reject(deps: Deps, request: Request, user: str, reason: str = "") -> str | None:
    deps.requests.reject(request.id, user, reason.strip())  # the requester's Reject withdraws their own request
    return None


def retry_valid(deps: Deps, request: Request, user: str, *, client: WebClient, channel: str | None, ts: str | None) -> str | None:
    """One retry request however many clicks (the store's compare-and-set); the button is replaced
    by the number of the request that carries the retry as soon as there is one."""
    try:
        new = deps.requests.retry_valid(request.id, user)
    except Conflict:
        replace_retry_button(deps, client, request.id, channel, ts, None)
        raise
    replace_retry_button(deps, client, request.id, channel, ts, user)
    return f"Request #{new.id} checks the {new.count:,} valid names of #{request.id}."


def replace_retry_button(deps: Deps, client: WebClient, request_id: int, channel: str | None, ts: str | None, by: str | None) -> None:
    request = deps.requests.require(request_id)
    if not channel or not ts or request.retried_as is None:
        return
    text, content = check_failed_content(deps.requests, request, retried_by=by)
    client.chat_update(channel=channel, ts=ts, text=text, blocks=content)


def cancel(deps: Deps, request: Request, user: str) -> str | None:
    deps.requests.cancel(request.id, user)
    return None


def send_credentials(deps: Deps, request: Request, user: str) -> str | None:
    if not deps.credentials_dm:
        return "Sending credentials in Slack is turned off here; ask an operator for `iotreg credentials`."
    rows = deps.requests.credentials(request.id, user)  # checked (and a refusal recorded) here
    # One file at a time per person and request, whichever replica each click reaches.
    if not deps.requests.leases.take(credentials_lease(request.id, user)):
        return "Your credentials file is on its way; it will arrive in a direct message."
    try:
        deps.slow.submit(export_credentials, deps, request, user, rows)
    except BaseException:
        deps.requests.leases.release(credentials_lease(request.id, user))
        raise
    return f"Preparing the credentials of request #{request.id}; they will arrive in a direct message."


def export_credentials(deps: Deps, request: Request, user: str, credentials: Iterator[tuple[str, str, str, str]]) -> None:
    """Fetch every device's secret from IoT Platform and DM it as a CSV file (never stored)."""
    client = deps.approvers.client
    lease = credentials_lease(request.id, user)
    try:
        rows = list(credentials)
        dm = client.conversations_open(users=user)["channel"]["id"]
        if not rows:
            client.chat_postMessage(channel=dm, text=f"Request #{request.id} has no registered device.")
            return
        client.files_upload_v2(
            channel=dm,
            content="".join(report.credentials_csv(rows)),
            filename=f"credentials-{request.product_key}-{request.id}.csv",
            title=f"Device credentials, request #{request.id}",
            initial_comment=f"The credentials of the {len(rows):,} devices of request #{request.id}. Keep this file private; delete this message once you have stored it.",
        )
        deps.requests.record(request.id, user, "credentials_sent", {"devices": len(rows)})
    except Exception as exc:  # noqa: BLE001 - this thread is an edge: the clicker must hear something
        log.exception("sending the credentials of request #%d failed", request.id)
        deps.requests.leases.release(lease)  # before saying so: a click on the message's heels may try again
        client.chat_postMessage(channel=user, text=f"The credentials of request #{request.id} could not be sent ({type(exc).__name__}); try the button again later.")
    finally:
        if lease in deps.requests.leases.held():
            deps.requests.leases.release(lease)


def credentials_lease(request_id: int, user: str) -> str:
    return f"credentials:{request_id}:{user}"
