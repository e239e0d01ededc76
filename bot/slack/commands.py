"""``/devices``: one slash command, acknowledged at once, its slow work done after the ack."""

from __future__ import annotations

import json
import logging
import re
import shlex
import uuid

from slack_bolt import Ack, App, Respond
from slack_sdk import WebClient

from bot import store as st
from bot.names import DeviceListError, parse_pasted
from bot.registration import Conflict, NotFound, WorkflowError
from bot.slack import blocks
from bot.slack.deps import Deps

log = logging.getLogger(__name__)
PRODUCT_KEY = re.compile(r"[A-Za-z0-9]{4,32}")
MAX_COUNT = 1_000_000


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
            register_command(ack, client, deps, command, words[1:])
        elif verb == "status" and len(words) == 2:
            # In the ack when the database alone can answer (reads never wait for a writer in WAL
            # mode): no second trip to Slack. When the answer depends on an approver group that is
            # not cached, after the ack, off Bolt's listener threads, so no ack waits on Slack.
            answer = answer_now(status, deps, words[1], user, channel, ask_slack=False)
            if answer is not None:
                ack(text=answer)
            else:
                ack()
                deps.background.submit(reply, respond, status, deps, words[1], user, channel)
        elif verb == "cancel" and len(words) == 2:
            ack()  # a write, and it may ask Slack whether the user is an approver
            deps.background.submit(reply, respond, cancel, deps, words[1], user, channel)
        elif verb == "list":
            ack(text=answer_now(listing, deps, channel))
        else:
            prefix = "" if verb == "help" else f"I don't know `{blocks.escape(' '.join(words))}`.\n"
            ack(text=prefix + blocks.help_text())


def register_command(ack: Ack, client: WebClient, deps: Deps, command: dict, args: list[str]) -> None:
    usage = f"Usage: `{blocks.COMMAND} register &lt;ProductKey&gt;` (then upload a file), add names after it, or `--count N`."
    if not args:
        ack(text=usage)
        return
    product_key, rest = args[0], args[1:]
    if not PRODUCT_KEY.fullmatch(product_key):
        ack(text=f"`{blocks.escape(product_key)}` is not a ProductKey: it is letters and digits, like `a1BwAGVxxxx`. {usage}")
        return
    user, channel = command["user_id"], command["channel_id"]
    if not rest:
        ack()
        metadata = {"channel": channel, "user": user, "product_key": product_key, "draft": uuid.uuid4().hex[:12]}
        client.views_open(trigger_id=command["trigger_id"], view=blocks.register_modal(product_key, metadata, deps.label))
        return
    if rest[0] == "--count":
        if len(rest) != 2 or not re.fullmatch(r"[0-9]{1,7}", rest[1]) or not 1 <= int(rest[1]) <= MAX_COUNT:
            ack(text=f"`--count` takes a number of devices from 1 to {MAX_COUNT:,}.")
            return
        # Stored before the ack (a few milliseconds): once told "asking", the user never loses it.
        request = deps.workflow.submit_count(product_key, user, int(rest[1]), origin="slack", channel=channel)
        ack(text=f"Request #{request.id}: asking for {int(rest[1]):,} devices in `{product_key}`…")
        return
    try:
        devices = parse_pasted(" ".join(rest))
    except DeviceListError as exc:
        ack(text=exc.message)
        return
    # Stored before the ack: a command's text holds a few hundred names at most, milliseconds to
    # store, and once told "checking" the user must never lose the request to a restart.
    request = deps.workflow.submit(
        product_key, user, devices.devices, origin="slack", channel=channel,
        rejected=devices.rejected, rejected_count=devices.rejected_count,
    )
    ack(text=f"Request #{request.id}: checking {blocks.plural(len(devices.devices), 'name')} for `{product_key}`…")


def answer_now(answer, *args, **kwargs) -> str | None:
    """An answer computed in the listener, for the ack itself."""
    try:
        return answer(*args, **kwargs)
    except Exception:  # noqa: BLE001 - this listener is an edge: the user must hear something
        log.exception("answering /devices failed")
        return blocks.SORRY


def reply(respond: Respond, answer, *args) -> None:
    """Compute an answer and send it through the command's response_url (in the background pool)."""
    try:
        text = answer(*args)
    except Exception:  # noqa: BLE001 - this thread is an edge: the user must hear something
        log.exception("answering /devices failed")
        text = blocks.SORRY
    respond(text=text)


NUMBER = re.compile(r"#?([0-9]{1,18})")  # ASCII digits only, and within SQLite's INTEGER


def find_request(deps: Deps, ref: str) -> st.Request | None:
    """A request by its number (``12``, ``#12``) or by one of its ApplyIds."""
    match = NUMBER.fullmatch(ref)
    if not match:
        return None
    number = int(match[1])
    chunk = deps.workflow.store.chunk_for_apply_id(number)
    if chunk is not None:
        return deps.workflow.get(chunk.request_id)
    return deps.workflow.get(number)


def status(deps: Deps, ref: str, user: str, channel: str, *, ask_slack: bool = True) -> str | None:
    """The request's status; ``None`` when only Slack can say whether ``user`` may see it and
    ``ask_slack`` is false."""
    request = find_request(deps, ref)
    if request is not None and channel != request.channel and user != request.requester:
        if not ask_slack and not deps.approvers.answers_at_once(user):
            return None
        if deps.approvers.why_not(user) is not None:
            request = None  # a request from another channel is not everyone's to see
    if request is None:
        return f"There is no request or ApplyId `{blocks.escape(ref)}`. `{blocks.COMMAND} list` shows this channel's requests."
    apply_ids = [c.apply_id for c in deps.workflow.store.chunks(request.id) if c.apply_id]
    return blocks.status_text(deps.workflow.summary(request.id), apply_ids)


def listing(deps: Deps, channel: str) -> str:
    store = deps.workflow.store
    rows = [(r, store.outcome_counts(r.id).get(st.CREATED, 0)) for r in store.requests(channel=channel, limit=10)]
    return blocks.list_text(rows)


def cancel(deps: Deps, ref: str, user: str, channel: str = "") -> str:
    request = find_request(deps, ref)
    if request is None:
        return f"There is no request `{blocks.escape(ref)}`."
    if user != request.requester and deps.approvers.why_not(user) is not None:
        return f"Only {blocks.user(request.requester)} or an approver can cancel request #{request.id}."
    try:
        deps.workflow.cancel(request.id, user)
    except (Conflict, NotFound, WorkflowError) as exc:
        return f"Request #{request.id} cannot be cancelled: {exc}."
    return f"Request #{request.id} is cancelled; nothing was registered."


def metadata_of(view: dict) -> dict:
    """The modal's private_metadata, or ``{}`` when it is not the object iotreg put there."""
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
