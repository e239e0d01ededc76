"""The buttons: approve, reject, retry with the valid names, cancel, send me the credentials.

Every click is acknowledged first, then checked on the server (who clicked, whether the request
can still take it); a click that changes nothing is answered, ephemerally, with why.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

from slack_bolt import Ack, App
from slack_sdk import WebClient

from bot import report
from bot.domain import Conflict, NotAllowed, NotFound, Request, WorkflowError
from bot.slack import blocks
from bot.slack.deps import Deps
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
    deps.requests.approve(request.id, user)
    return None


def reject(deps: Deps, request: Request, user: str) -> str | None:
    deps.requests.reject(request.id, user)  # the requester's Reject withdraws their own request
    return None


def retry_valid(deps: Deps, request: Request, user: str) -> str | None:
    new = deps.requests.retry_valid(request.id, user)
    return f"Request #{new.id} checks the {new.count:,} valid names of #{request.id}."


def cancel(deps: Deps, request: Request, user: str) -> str | None:
    deps.requests.cancel(request.id, user)
    return None


def send_credentials(deps: Deps, request: Request, user: str) -> str | None:
    if not deps.credentials_dm:
        return "Sending credentials in Slack is turned off here; ask an operator for `iotreg credentials`."
    rows = deps.requests.credentials(request.id, user)  # checked (and a refusal recorded) here
    key = (request.id, user)
    with deps.lock:
        if key in deps.in_flight:
            return "Your credentials file is on its way; it will arrive in a direct message."
        deps.in_flight.add(key)
    deps.background.submit(export_credentials, deps, request, user, rows)
    return f"Preparing the credentials of request #{request.id}; they will arrive in a direct message."


def export_credentials(deps: Deps, request: Request, user: str, credentials: Iterator[tuple[str, str, str, str]]) -> None:
    """Fetch every device's secret from IoT Platform and DM it as a CSV file (never stored)."""
    client = deps.approvers.client
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
        client.chat_postMessage(channel=user, text=f"The credentials of request #{request.id} could not be sent ({type(exc).__name__}); try the button again later.")
    finally:
        with deps.lock:
            deps.in_flight.discard((request.id, user))
