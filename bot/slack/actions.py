"""The buttons: approve, reject, retry with the valid names, cancel, send me the credentials.

Every click is acknowledged first, then checked on the server (who clicked, whether the request
can still take it); a click that changes nothing is answered, ephemerally, with why.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from slack_bolt import Ack, App
from slack_sdk import WebClient

from bot import report
from bot.registration import Conflict, NotAllowed, NotFound, WorkflowError
from bot.slack import blocks
from bot.slack.deps import Deps
from bot.slack.views import tell
from bot.store import Request

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
    on(blocks.REJECT, reject)
    on(blocks.RETRY_VALID, retry_valid)
    on(blocks.CANCEL, cancel)
    on(blocks.CREDENTIALS, send_credentials)


def carry_out(deps: Deps, client: WebClient, handle: Callable[[Deps, Request, str], str | None], value: str, user: str, channel: str | None) -> None:
    try:
        answer = dispatch(deps, handle, value, user)
    except Exception:  # noqa: BLE001 - this thread is an edge: the clicker must hear something
        log.exception("a button click failed")
        answer = blocks.SORRY
    if answer and channel:
        tell(client, channel, user, answer)


def dispatch(deps: Deps, handle: Callable[[Deps, Request, str], str | None], value: str, user: str) -> str | None:
    if not re.fullmatch(r"[0-9]{1,18}", value or ""):
        return "This button is not tied to a registration request."
    request = deps.workflow.get(int(value))
    if request is None:
        return f"Request #{value} no longer exists."
    try:
        return handle(deps, request, user)
    except NotAllowed as exc:
        return f"{str(exc)[0].upper()}{str(exc)[1:]}."
    except Conflict as exc:
        return f"Nothing changed: {exc}."
    except (NotFound, WorkflowError) as exc:
        return str(exc)


def approve(deps: Deps, request: Request, user: str) -> str | None:
    reason = deps.approvers.why_not(user)
    if reason:
        deps.workflow.store.record(request.id, user, "approval_denied", deps.workflow.clock.now(), {"why": "not an approver"})
        return reason
    deps.workflow.approve(request.id, user, allow_self=deps.allow_self_approval)
    return None


def reject(deps: Deps, request: Request, user: str) -> str | None:
    if user == request.requester:
        deps.workflow.cancel(request.id, user)  # the requester withdrawing their own request
        return None
    reason = deps.approvers.why_not(user)
    if reason:
        return reason
    deps.workflow.reject(request.id, user)
    return None


def retry_valid(deps: Deps, request: Request, user: str) -> str | None:
    if user != request.requester and deps.approvers.why_not(user) is not None:
        return f"Only {blocks.user(request.requester)} or an approver can retry request #{request.id}."
    new = deps.workflow.retry_valid(request.id, user)
    return f"Request #{new.id} checks the {new.count:,} valid names of #{request.id}."


def cancel(deps: Deps, request: Request, user: str) -> str | None:
    if user != request.requester and deps.approvers.why_not(user) is not None:
        return f"Only {blocks.user(request.requester)} or an approver can cancel request #{request.id}."
    deps.workflow.cancel(request.id, user)
    return None


def send_credentials(deps: Deps, request: Request, user: str) -> str | None:
    if not deps.credentials_dm:
        return "Sending credentials in Slack is turned off here; ask an operator for `iotreg credentials`."
    if not deps.approvers.may_see(user, request):
        deps.workflow.store.record(request.id, user, "credentials_denied", deps.workflow.clock.now())
        return f"Only {blocks.user(request.requester)} and the approvers can get the credentials of request #{request.id}."
    key = (request.id, user)
    with deps.lock:
        if key in deps.in_flight:
            return "Your credentials file is on its way; it will arrive in a direct message."
        deps.in_flight.add(key)
    deps.slow.submit(export_credentials, deps, request, user)
    return f"Preparing the credentials of request #{request.id}; they will arrive in a direct message."


def export_credentials(deps: Deps, request: Request, user: str) -> None:
    """Fetch every device's secret from IoT Platform and DM it as a CSV file (never stored)."""
    client = deps.approvers.client
    try:
        rows = list(deps.workflow.credentials(request.id))
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
        deps.workflow.store.record(request.id, user, "credentials_sent", deps.workflow.clock.now(), {"devices": len(rows)})
    except Exception as exc:  # noqa: BLE001 - this thread is an edge: the clicker must hear something
        log.exception("sending the credentials of request #%d failed", request.id)
        client.chat_postMessage(channel=user, text=f"The credentials of request #{request.id} could not be sent ({type(exc).__name__}); try the button again later.")
    finally:
        with deps.lock:
            deps.in_flight.discard((request.id, user))
