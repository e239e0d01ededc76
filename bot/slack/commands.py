"""``/devices``: one slash command, acknowledged at once; anything that may be slow (a call to
Slack or IoT Platform, a write, counting a big request) is done after the ack."""

from __future__ import annotations

import json
import logging
import re
import shlex
import uuid

from slack_bolt import Ack, App, Respond
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from bot.aliyun.errors import IotError
from bot.domain import NotAllowed, Origin, WorkflowError
from bot.service import ReasonRequired
from bot.names import DeviceListError, parse_pasted
from bot.slack import blocks
from bot.slack.approvers import NeedsSlack
from bot.slack.deps import Deps

log = logging.getLogger(__name__)
PRODUCT_KEY = re.compile(r"[A-Za-z0-9]{4,32}")
MAX_COUNT = 1_000_000
#: The most devices whose outcomes an answer in the ack may count (tens of milliseconds of reads).
AT_ONCE_DEVICES = 50_000


def register(app: App, deps: Deps) -> None:
    @app.command(blocks.COMMAND)
    def devices(ack: Ack, command: dict, client: WebClient, respond: Respond) -> None:
        try:
            words = shlex.split(command.get("text") or "")
        except ValueError:
            words = (command.get("text") or "").split()
        verb = words[0].lower() if words else "help"
        user, channel = command["user_id"], command["channel_id"]
        if verb == "register":
            register_command(ack, client, deps, command, words[1:], respond)
        elif verb == "status" and len(words) == 2:
            in_ack_or_after(ack, respond, deps, status, words[1], user, channel)
        elif verb == "cancel" and len(words) == 2:
            # After the ack, off Bolt's listener threads: a write, and it may ask Slack whether
            # the user is an approver; no ack may wait on either.
            ack()
            deps.background.submit(reply, respond, cancel, deps, words[1], user, channel)
        elif verb == "list":
            in_ack_or_after(ack, respond, deps, listing, channel)
        else:
            prefix = "" if verb == "help" else f"I don't know {blocks.escape(' '.join(words), code=True, limit=200)}.\n"
            ack(text=prefix + blocks.help_text())


def register_command(ack: Ack, client: WebClient, deps: Deps, command: dict, args: list[str], respond: Respond) -> None:
    usage = (
        f"Usage: `{blocks.COMMAND} register [ProductKey]` (then upload a file), add names after it, or `--count N`; "
        f"`--reason \"…\"` says why."
    )
    user, channel = command["user_id"], command["channel_id"]
    if not args:
        ack()  # the product list comes from IoT Platform: asked after the ack, the form opened after it
        open_form(deps, client, command, None, respond)
        return
    product_key, rest = args[0], args[1:]
    if not PRODUCT_KEY.fullmatch(product_key):
        ack(text=f"{blocks.escape(product_key, code=True, limit=100)} is not a ProductKey: it is letters and digits, like `a1BwAGVxxxx`. {usage}")
        return
    if "--reason" in rest:
        at = rest.index("--reason")
        if at + 1 >= len(rest) or not rest[at + 1].strip() or rest[at + 1].startswith("--"):
            ack(text=f"`--reason` takes the reason, in quotes: `--reason \"new cameras for line 4\"`. {usage}")
            return
        reason, rest = rest[at + 1][: blocks.MAX_REASON], rest[:at] + rest[at + 2 :]
    else:
        reason = ""
    if not rest:
        ack()
        open_form(deps, client, command, product_key, respond)
        return
    try:
        if rest[0] == "--count":
            if len(rest) != 2 or not re.fullmatch(r"[0-9]{1,7}", rest[1]) or not 1 <= int(rest[1]) <= MAX_COUNT:
                ack(text=f"`--count` takes a number of devices from 1 to {MAX_COUNT:,}.")
                return
            # Stored before the ack (a few milliseconds): once told "asking", the user never loses it.
            request = deps.requests.submit_count(product_key, user, int(rest[1]), origin=Origin.SLACK, channel=channel, reason=reason)
            ack(text=f"Request #{request.id}: asking for {int(rest[1]):,} devices in `{product_key}`…")
            return
        try:
            devices = parse_pasted(" ".join(rest))
        except DeviceListError as exc:
            ack(text=blocks.escape(exc.message))
            return
        # Stored before the ack: a command's text holds a few hundred names at most, milliseconds to
        # store, and once told "checking" the user must never lose the request to a restart.
        request = deps.requests.submit(
            product_key, user, devices.devices, origin=Origin.SLACK, channel=channel,
            rejected=devices.rejected, rejected_count=devices.rejected_count, reason=reason,
        )
    except ReasonRequired as exc:
        ack(text=f"Nothing was requested: {exc}. Add `--reason \"…\"` to the command.")
        return
    ack(text=f"Request #{request.id}: checking {blocks.plural(len(devices.devices), 'name')} for `{product_key}`…")


def open_form(deps: Deps, client: WebClient, command: dict, product_key: str | None, respond: Respond) -> None:
    """The register form: for ``product_key``, or with a product select (QueryProductList), the
    product last used in the channel chosen."""
    user, channel = command["user_id"], command["channel_id"]
    metadata = {"channel": channel, "user": user, "product_key": product_key or "", "draft": uuid.uuid4().hex[:12]}
    if product_key:
        required = deps.requests.rule_for(product_key).reason_required
        view = blocks.register_modal(product_key, metadata, deps.label, reason_required=required)
    else:
        try:
            products = [(p.product_key, p.name) for p in deps.requests.products()]
        except IotError as exc:
            client.chat_postEphemeral(
                channel=channel, user=user,
                text=f"I could not list the products ({exc.code or type(exc).__name__}): run `{blocks.COMMAND} register &lt;ProductKey&gt;` instead.",
            )
            return
        if not products:
            client.chat_postEphemeral(channel=channel, user=user, text="IoT Platform lists no product for this account: create one first.")
            return
        view = blocks.register_modal(None, metadata, deps.label, products=products, initial=deps.requests.last_product(channel))
    try:
        client.views_open(trigger_id=command["trigger_id"], view=view)
    except (SlackClientError, OSError) as exc:  # after slack-sdk's retries: the person must hear it
        log.warning("views.open failed for /devices register: %s", slack_failure(exc))
        respond(text=blocks.form_not_opened(product_key, slack_failure(exc)))


def slack_failure(exc: Exception) -> str:
    """What Slack answered, in a few words: its error code, else the HTTP status, else the exception."""
    if isinstance(exc, SlackApiError):
        error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
        if isinstance(error, str) and re.fullmatch(r"[a-z_]{1,60}", error):  # a code, not an HTML page
            return f"`{error}`"
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


def in_ack_or_after(ack: Ack, respond: Respond, deps: Deps, answer, *args) -> None:
    """Answer in the ack itself when ``answer(deps, *args, at_once=True)`` can: a few reads of an
    embedded database (which never wait for a writer in WAL mode) and no call to Slack, so no
    second trip through the response_url. Otherwise (a database server, whose round trips would
    hold the ack back; a call to Slack; a big request to count) ack now and answer after, in the
    background pool."""
    text = computed(answer, deps, *args, at_once=True) if deps.requests.reads_in_process else None
    if text is not None:
        ack(text=text)
    else:
        ack()
        deps.background.submit(reply, respond, answer, deps, *args)


def reply(respond: Respond, answer, *args) -> None:
    """Compute an answer and send it through the command's response_url (in the background pool)."""
    respond(text=computed(answer, *args))


def computed(answer, *args, **kwargs) -> str | None:
    """``answer(*args, **kwargs)``, or an apology if it failed: the user must hear something."""
    try:
        return answer(*args, **kwargs)
    except Exception:  # noqa: BLE001 - listeners and the background pool are edges
        log.exception("answering /devices failed")
        return blocks.SORRY


def status(deps: Deps, ref: str, user: str, channel: str, *, at_once: bool = False) -> str | None:
    """A request's status. ``at_once``: ``None`` instead when the answer needs Slack (is ``user``
    in an approver group?) or counts more than :data:`AT_ONCE_DEVICES` devices."""
    request = deps.requests.find(ref)
    if request is not None and channel != request.channel and user != request.requester:
        try:
            if deps.approvers.why_not(user, ask_slack=not at_once) is not None:
                request = None  # a request from another channel is not everyone's to see
        except NeedsSlack:
            return None
    if request is None:
        return f"There is no request or ApplyId {blocks.escape(ref, code=True, limit=100)}. `{blocks.COMMAND} list` shows this channel's requests."
    if at_once and request.count > AT_ONCE_DEVICES:
        return None
    return blocks.status_text(deps.requests.summary(request.id), deps.requests.apply_ids(request.id))


def listing(deps: Deps, channel: str, *, at_once: bool = False) -> str | None:
    """The channel's last ten requests. ``at_once``: ``None`` instead when they hold more than
    :data:`AT_ONCE_DEVICES` devices to count."""
    requests = deps.requests.requests(channel=channel, limit=10)
    if at_once and sum(r.count for r in requests) > AT_ONCE_DEVICES:
        return None
    return blocks.list_text([(r, deps.requests.created_count(r.id)) for r in requests])


def cancel(deps: Deps, ref: str, user: str, channel: str = "") -> str:
    request = deps.requests.find(ref)
    if request is None:
        return f"There is no request {blocks.escape(ref, code=True, limit=100)}."
    try:
        deps.requests.cancel(request.id, user)
    except NotAllowed as exc:
        return blocks.refusal(exc, request)
    except WorkflowError as exc:
        return f"Request #{request.id} cannot be cancelled: {exc}."
    return f"Request #{request.id} is cancelled; nothing was registered."


def metadata_of(view: dict) -> dict:
    """The modal's private_metadata, or ``{}`` when it is not the object iotreg put there."""
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
