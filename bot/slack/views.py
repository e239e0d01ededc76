"""The upload modal's submission: quick checks answered in the modal, the rest after the ack."""

from __future__ import annotations

import logging

from slack_bolt import Ack, App
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.names import DeviceList, DeviceListError, parse_pasted
from bot.slack import blocks
from bot.slack.commands import PRODUCT_KEY, metadata_of
from bot.slack.deps import Deps
from bot.slack.files import fetch_device_list
from bot.domain import Origin, Upload
from bot.service import ReasonRequired
from bot.store import AlreadyRead

log = logging.getLogger(__name__)
ACCEPTED = (".csv", ".txt")
#: Seconds between looks for device lists left unread (by a restart, or a replica that died).
UPLOAD_SWEEP = 30.0


def register(app: App, deps: Deps) -> None:
    @app.view(blocks.VIEW_REGISTER)
    def submitted(ack: Ack, body: dict, view: dict, client: WebClient) -> None:
        meta = metadata_of(view)
        values = (view.get("state") or {}).get("values") or {}
        files = ((values.get(blocks.FILE_BLOCK) or {}).get(blocks.FILE_BLOCK) or {}).get("files") or []
        pasted = ((values.get(blocks.NAMES_BLOCK) or {}).get(blocks.NAMES_BLOCK) or {}).get("value") or ""
        reason = (((values.get(blocks.REASON_BLOCK) or {}).get(blocks.REASON_BLOCK) or {}).get("value") or "").strip()
        if not meta.get("product_key"):  # chosen in the form
            chosen = ((values.get(blocks.PRODUCT_BLOCK) or {}).get(blocks.PRODUCT_BLOCK) or {}).get("selected_option") or {}
            meta["product_key"] = chosen.get("value", "")
        user = (body.get("user") or {}).get("id") if isinstance(body.get("user"), dict) else None
        # The context must be the one iotreg put there for this person: the submitter named in it,
        # a ProductKey that passes the command's check.
        if (
            not user
            or not meta.get("channel")
            or meta.get("user") != user
            or not PRODUCT_KEY.fullmatch(str(meta.get("product_key", "")))
        ):
            ack(response_action="errors", errors={blocks.NAMES_BLOCK: "This form has lost its context; run /devices register again."})
            return
        if deps.requests.rule_for(meta["product_key"]).reason_required and not reason:
            ack(response_action="errors", errors={blocks.REASON_BLOCK: f"Requests for {meta['product_key']} need a reason: say why these devices are needed."})
            return
        if not files and not pasted.strip():
            ack(response_action="errors", errors={blocks.NAMES_BLOCK: "Upload a CSV or TXT file above, or paste device names here."})
            return
        if files and pasted.strip():
            ack(response_action="errors", errors={blocks.NAMES_BLOCK: "Use the file or this box, not both."})
            return
        if files and not str(files[0].get("name", "")).lower().endswith(ACCEPTED) and files[0].get("filetype") not in ("csv", "text"):
            ack(response_action="errors", errors={blocks.FILE_BLOCK: "Upload a .csv or .txt file (save a workbook as CSV first)."})
            return
        # Recorded before the ack, so that a restart between the two cannot lose the list: the
        # form has closed for the uploader by then. Read after the ack (a download can be slow).
        upload_id = deps.requests.add_upload(
            user=user, channel=meta["channel"], product_key=meta["product_key"], origin_data={"files": files, "reason": reason[: blocks.MAX_REASON]}, pasted=pasted
        )
        ack()
        deps.slow.submit(take_list, deps, client, upload_id)


def take_list(deps: Deps, client: WebClient, upload_id: int) -> None:
    """After the ack (or later, for one a restart or a dead replica left unread): read the list into
    a request, or tell the uploader why not. Either way the upload is done once, by one process."""
    with deps.requests.reading_upload(upload_id) as upload:
        if upload is not None:
            read_list(deps, client, upload)


def read_list(deps: Deps, client: WebClient, upload: Upload) -> None:
    channel, product_key, user = upload.channel, upload.product_key, upload.user
    try:
        devices = read_submission(deps, upload.origin_data.get("files", []), upload.pasted)
    except DeviceListError as exc:
        tell(client, channel, user, f"Your device list for {blocks.escape(product_key, code=True)} was not used: {blocks.escape(exc.message)}")
        deps.requests.finish_upload(upload.id)
        return
    except Exception:  # noqa: BLE001 - this thread is an edge: the uploader must hear something
        log.exception("reading a submitted device list failed")
        tell(client, channel, user, f"Your device list for {blocks.escape(product_key, code=True)} could not be read because of an error on iotreg's side; it has been logged.")
        deps.requests.finish_upload(upload.id)
        return
    try:
        deps.requests.submit(
            product_key, user, devices.devices, origin=Origin.SLACK, channel=channel,
            rejected=devices.rejected, rejected_count=devices.rejected_count, upload_id=upload.id,
            reason=upload.origin_data.get("reason", ""), read_as=devices.read_as,
        )
    except AlreadyRead:  # another replica read it while this one did: its request stands
        log.info("upload #%d was read into a request elsewhere", upload.id)
    except ReasonRequired as exc:  # the policy changed between the form and now
        tell(client, channel, user, f"Your device list for {blocks.escape(product_key, code=True)} was not used: {blocks.escape(str(exc))}.")
        deps.requests.finish_upload(upload.id)


def resume_uploads(deps: Deps, client: WebClient) -> int:
    """At start, and every :data:`UPLOAD_SWEEP` seconds: read the lists a restart interrupted, or
    a replica that died left unread (one another replica is reading is left to it)."""
    unread = deps.requests.unread_uploads()
    for upload in unread:
        deps.slow.submit(take_list, deps, client, upload.id)
    return len(unread)


def tell(client: WebClient, channel: str, user: str, text: str) -> None:
    """A message for one person: ephemeral in the channel, or by DM if the bot cannot post there."""
    try:
        client.chat_postEphemeral(channel=channel, user=user, text=text)
    except SlackApiError:
        client.chat_postMessage(channel=user, text=text)


def read_submission(deps: Deps, files: list[dict], pasted: str) -> DeviceList:
    if files:
        return fetch_device_list(files[0], token=deps.bot_token, api_url=deps.api_url)
    return parse_pasted(pasted)
