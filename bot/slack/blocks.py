"""Everything iotreg says in Slack, as pure functions from domain objects to Block Kit.

No function here calls Slack: each returns ``(text, blocks)`` or a view dict, so tests compare data.
``text`` always comes with ``blocks``: it is the notification and the fallback.

Limits respected here (slack-platform.md): at most 50 blocks a message, 3,000 characters a section,
confirm texts of 300, button values of 2,000. Long device lists are cut with "… and N more": the
complete list goes into a CSV file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from bot.domain import STATES, DeviceRow, NotAllowed, RejectedLine, Request, State, Summary
from bot.policy import Why

COMMAND = "/devices"
SORRY = "Sorry, that did not work because of an error on iotreg's side; it has been logged."
#: The callback of the upload modal and the action ids of every button: the manifest test checks them.
VIEW_REGISTER = "register_devices"
APPROVE = "approve_request"
REJECT = "reject_request"
RETRY_VALID = "retry_valid"
CANCEL = "cancel_request"
CREDENTIALS = "send_credentials"
ACTION_IDS = (APPROVE, REJECT, RETRY_VALID, CANCEL, CREDENTIALS)

FILE_BLOCK = "file"
NAMES_BLOCK = "names"
SECTION_LIMIT = 2900  # a little under Slack's 3,000 characters
INLINE_DEVICES = 20  # longer lists go into a CSV file

Blocks = list[dict[str, Any]]


def escape(text: object) -> str:
    """Text a person or the platform wrote, made safe for mrkdwn (no mentions, no links)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def user(user_id: str) -> str:
    return f"<@{user_id}>" if user_id and user_id[0] in "UW" else escape(user_id)


def when(moment: datetime | None) -> str:
    """A time every reader sees in their own time zone."""
    if moment is None:
        return ""
    fallback = moment.strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(moment.timestamp())}^{{date_short_pretty}} at {{time}}|{fallback}>"


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


def context(*texts: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": t[:3000]} for t in texts if t]}


def button(text: str, action_id: str, value: str, style: str | None = None, confirm: dict | None = None) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "button", "text": {"type": "plain_text", "text": text[:75]}, "action_id": action_id, "value": value}
    if style:
        element["style"] = style
    if confirm:
        element["confirm"] = confirm
    return element


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def bullet_list(lines: Iterable[str], total: int, limit: int = INLINE_DEVICES, more: str = "") -> str:
    """Lines as a list that fits one section, ending with how many were left out."""
    shown: list[str] = []
    size = 0
    for line in lines:
        if len(shown) >= limit or size + len(line) + 1 > SECTION_LIMIT - 80:
            break
        shown.append(line)
        size += len(line) + 1
    text = "\n".join(shown)
    if total > len(shown):
        text += f"\n… and {total - len(shown):,} more{more}"
    return text


# -- the anchor message: one per request, kept current -----------------------------------------


#: The line a request's message shows for each state, from the one table of states.
STATE_LINES = {state: f"{info.emoji} {info.line}" for state, info in STATES.items()}


def anchor(
    request: Request,
    summary: Summary,
    *,
    approvers: str = "",
    progress: tuple[int, int] | None = None,
    credentials_button: bool = False,
    label: str = "",
) -> tuple[str, Blocks]:
    """The request's message in the channel, as it stands now."""
    what = (
        f"{plural(request.count, 'device')} named by the platform"
        if request.kind == "count"
        else plural(request.count, "device name")
    )
    title = f"*Device registration #{request.id}* · product `{escape(request.product_key)}` · {what} · requested by {user(request.requester)}"
    blocks: Blocks = []
    if label:
        blocks.append(context(label))
    blocks.append(section(title))
    state_line = STATE_LINES[request.state]
    if request.state == State.REGISTERING and progress:
        state_line += f" {progress[0]} of {plural(progress[1], 'part')} done."
    if request.state in (State.APPROVED, State.REGISTERING, State.DONE, State.FAILED) and request.decided_by:
        state_line += f"\nApproved by {user(request.decided_by)} at {when(request.decided_at)}."
    if request.state == State.REJECTED:
        state_line = f":no_entry_sign: Rejected by {user(request.decided_by or '')} at {when(request.decided_at)}: nothing was registered."
        if request.reason:
            state_line += f"\n>{escape(request.reason)}"
    if request.state == State.CANCELLED:
        state_line = f":heavy_multiplication_x: Cancelled by {user(request.decided_by or '')} at {when(request.decided_at)}: nothing was registered."
    if request.state == State.FAILED and request.reason:
        state_line += f"\n>{escape(request.reason)}"
    if request.state in (State.DONE, State.FAILED):
        state_line += "\n" + outcome_line(summary)
    blocks.append(section(state_line))
    facts = []
    if summary.rejected_locally:
        facts.append(f"{plural(summary.rejected_locally, 'line')} of the list skipped (see the thread)")
    if request.state == State.AWAITING_APPROVAL:
        if request.expires_at:
            facts.append(f"expires {when(request.expires_at)}")
        facts.append(f"approvers: {approvers}" if approvers else "anyone but the requester may approve")
    if facts:
        blocks.append(context(" · ".join(facts)))
    if request.state == State.AWAITING_APPROVAL:
        value = str(request.id)
        blocks.append(
            {
                "type": "actions",
                "block_id": f"decide-{request.id}",
                "elements": [
                    button("Approve", APPROVE, value, "primary"),
                    button(
                        "Reject",
                        REJECT,
                        value,
                        "danger",
                        confirm={
                            "title": {"type": "plain_text", "text": "Reject this registration?"},
                            "text": {"type": "mrkdwn", "text": f"Request #{request.id} will register nothing. This cannot be undone."},
                            "confirm": {"type": "plain_text", "text": "Reject"},
                            "deny": {"type": "plain_text", "text": "Keep it"},
                            "style": "danger",
                        },
                    ),
                ],
            }
        )
    if credentials_button and request.state in (State.DONE, State.FAILED) and summary.created:
        blocks.append(
            {
                "type": "actions",
                "block_id": f"credentials-{request.id}",
                "elements": [button("Send me the device credentials", CREDENTIALS, str(request.id))],
            }
        )
    text = f"Device registration #{request.id} ({escape(request.product_key)}): {request.state.label}"
    return text, blocks


def outcome_line(summary: Summary) -> str:
    parts = [f"*{summary.created:,}* registered"]
    if summary.failed:
        parts.append(f"*{summary.failed:,}* failed")
    if summary.invalid:
        parts.append(f"*{summary.invalid:,}* refused by the check")
    if summary.pending and summary.request.final:
        parts.append(f"*{summary.pending:,}* not confirmed")
    return ", ".join(parts) + "."


# -- thread replies -----------------------------------------------------------------------------


def rejected_lines_reply(rejected: Sequence[RejectedLine], total: int) -> tuple[str, Blocks]:
    lines = (f"• {f'line {r.line}: ' if r.line else ''}`{escape(r.value)}`: {escape(r.reason)}" for r in rejected)
    text = f"{plural(total, 'line')} of the list could not be used and will be skipped:"
    return text, [section(text), section(bullet_list(lines, total, more=" (all listed in the result file)"))]


def check_failed_reply(request: Request, invalid: Sequence[DeviceRow], invalid_total: int, valid: int) -> tuple[str, Blocks]:
    lines = (f"• `{escape(d.name)}`: {escape(d.reason or 'refused')}" for d in invalid)
    text = f"IoT Platform refused {plural(invalid_total, 'name')}; {plural(valid, 'name')} passed."
    blocks: Blocks = [section(text), section(bullet_list(lines, invalid_total))]
    elements = []
    if valid:
        elements.append(button(f"Retry with the {valid:,} valid names", RETRY_VALID, str(request.id), "primary"))
    elements.append(button("Cancel", CANCEL, str(request.id)))
    blocks.append({"type": "actions", "block_id": f"retry-{request.id}", "elements": elements})
    return text, blocks


def result_reply(summary: Summary, failed: Sequence[DeviceRow], created: Sequence[DeviceRow], *, with_file: bool) -> tuple[str, Blocks]:
    request = summary.request
    headline = f"Request #{request.id}: {outcome_line(summary)}"
    if request.state == State.FAILED and request.reason:
        headline += f"\n>{escape(request.reason)}"
    blocks: Blocks = [section(headline)]
    if failed:
        lines = (f"• `{escape(d.name)}`: {escape(d.reason or 'failed')}" for d in failed)
        blocks.append(section("*Not registered:*\n" + bullet_list(lines, summary.failed + (summary.pending if request.final else 0))))
    if created and not with_file:
        lines = (f"• `{escape(d.name)}`" + (f" · {escape(d.iot_id)}" if d.iot_id else "") for d in created)
        blocks.append(section("*Registered:*\n" + bullet_list(lines, summary.created)))
    if with_file:
        blocks.append(context("Every device's outcome is in the file below."))
    return headline.replace("*", ""), blocks


def notice(summary: Summary, permalink_hint: str = "") -> str:
    request = summary.request
    return (
        f"Device registration #{request.id} in product {escape(request.product_key)} ({user(request.requester)}): "
        f"{request.state.label}. {outcome_line(summary).replace('*', '')}{permalink_hint}"
    )


# -- the upload modal ------------------------------------------------------------------------------


def register_modal(product_key: str, metadata: dict[str, str], label: str = "") -> dict[str, Any]:
    """The modal of ``/devices register <ProductKey>``: a file, or names pasted."""
    blocks: Blocks = []
    if label:
        blocks.append(context(label))
    blocks += [
        section(f"Register devices in product `{escape(product_key)}`.\nUpload a CSV or TXT file, or paste the names below."),
        {
            "type": "input",
            "block_id": FILE_BLOCK,
            "optional": True,
            "label": {"type": "plain_text", "text": "Device list (CSV or TXT)"},
            "element": {"type": "file_input", "action_id": FILE_BLOCK, "filetypes": ["csv", "txt"], "max_files": 1},
            "hint": {"type": "plain_text", "text": "A DeviceName column (optional DeviceNickname), or one name per line. Up to 10 MB."},
        },
        {
            "type": "input",
            "block_id": NAMES_BLOCK,
            "optional": True,
            "label": {"type": "plain_text", "text": "Or paste device names"},
            "element": {
                "type": "plain_text_input",
                "action_id": NAMES_BLOCK,
                "multiline": True,
                "placeholder": {"type": "plain_text", "text": "one name per line, or separated by commas or spaces"},
            },
        },
    ]
    return {
        "type": "modal",
        "callback_id": VIEW_REGISTER,
        "private_metadata": json.dumps(metadata, separators=(",", ":")),
        "title": {"type": "plain_text", "text": "Register devices"},
        "submit": {"type": "plain_text", "text": "Check names"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": blocks,
    }


# -- ephemeral answers to /devices ----------------------------------------------------------------


def help_text() -> str:
    return "\n".join(
        [
            f"*{COMMAND}* registers IoT devices on Alibaba Cloud IoT Platform, after an approval.",
            f"• `{COMMAND} register &lt;ProductKey&gt;`: upload a CSV/TXT file or paste names",
            f"• `{COMMAND} register &lt;ProductKey&gt; name1 name2 …`: names right in the command",
            f"• `{COMMAND} register &lt;ProductKey&gt; --count N`: N devices named by the platform",
            f"• `{COMMAND} status &lt;request id or ApplyId&gt;`: where a request stands",
            f"• `{COMMAND} list`: recent requests in this channel",
            f"• `{COMMAND} cancel &lt;request id&gt;`: withdraw a request before it is approved",
            f"• `{COMMAND} help`: this message",
        ]
    )


def status_text(summary: Summary, apply_ids: Sequence[int]) -> str:
    request = summary.request
    lines = [
        f"*Request #{request.id}* · product `{escape(request.product_key)}` · requested by {user(request.requester)} {when(request.created_at)}",
        f"State: *{request.state.label}*" + (f": {escape(request.reason)}" if request.reason else ""),
        outcome_line(summary) if request.state in (State.DONE, State.FAILED, State.REGISTERING) else f"{plural(request.count, 'device')}",
    ]
    if apply_ids:
        lines.append("ApplyId: " + ", ".join(str(a) for a in apply_ids))
    return "\n".join(lines)


def list_text(rows: Sequence[tuple[Request, int]]) -> str:
    if not rows:
        return "No registration requests in this channel yet."
    lines = ["*Recent registration requests in this channel:*"]
    for request, created in rows:
        lines.append(
            f"• #{request.id} · `{escape(request.product_key)}` · {request.state.label} · "
            f"{request.count:,} devices, {created:,} registered · {user(request.requester)} {when(request.created_at)}"
        )
    return "\n".join(lines)


def refusal(exc: NotAllowed, request: Request) -> str:
    """The core's refusal, worded for Slack."""
    denial = exc.denial
    if denial is not None and denial.why is Why.NOT_REQUESTER_OR_APPROVER:
        return f"Only {user(request.requester)} or an approver can {denial.action} request #{request.id}."
    if denial is not None and denial.why is Why.NOT_ENTITLED:
        return f"Only {user(request.requester)} and the approvers can get the credentials of request #{request.id}."
    if denial is not None and denial.detail:
        return denial.detail
    return f"{str(exc)[0].upper()}{str(exc)[1:]}."
