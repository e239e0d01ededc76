"""Everything iotreg says in Slack, as pure functions from domain objects to Block Kit.

No function here calls Slack: each returns ``(text, blocks)`` or a view dict, so tests compare data.
``text`` always comes with ``blocks``: it is the notification and the fallback.

Limits respected here (slack-platform.md): at most 50 blocks a message, 3,000 characters a section,
confirm texts of 300, button values of 2,000. Long device lists are cut with "… and N more": the
complete list goes into a CSV file.

Text that came from a person, a file or the platform goes into mrkdwn through :func:`escape` only,
which keeps it inside the formatting it is put in: no link, no mention, no formatting of its own,
no code span closed early, no line break, and never longer than its room.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from bot.domain import STATES, Approval, DeviceRow, Kind, NotAllowed, RejectedLine, Request, State, Summary
from bot.policy import Why

COMMAND = "/devices"
SORRY = "Sorry, that did not work because of an error on iotreg's side; it has been logged."
#: The callback of the upload modal and the action ids of every button: the manifest test checks them.
VIEW_REGISTER = "register_devices"
VIEW_REJECT = "reject_with_reason"
VIEWS = (VIEW_REGISTER, VIEW_REJECT)
APPROVE = "approve_request"
REJECT = "reject_request"
RETRY_VALID = "retry_valid"
CANCEL = "cancel_request"
CREDENTIALS = "send_credentials"
ACTION_IDS = (APPROVE, REJECT, RETRY_VALID, CANCEL, CREDENTIALS)

FILE_BLOCK = "file"
NAMES_BLOCK = "names"
REASON_BLOCK = "reason"
PRODUCT_BLOCK = "product"
MAX_REASON = 500  # characters of a reason kept
SECTION_LIMIT = 2900  # a little under Slack's 3,000 characters
INLINE_DEVICES = 20  # longer lists go into a CSV file
IOT_IDS_AFTER = "IotIds are read from IoT Platform after this result; the device credentials always have them."
IOT_IDS_AFTER_FILE = "IotIds are read from IoT Platform after this result, so the file may lack some; the device credentials always have them."
VALUE_LIMIT = 100  # a name or a rejected line as shown in a list (the reader cuts values at 80)
REASON_LIMIT = 300  # why it was refused

Blocks = list[dict[str, Any]]


#: Characters Slack's mrkdwn reads as markup, and what they are shown as instead.
_CODE_MARKUP = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "`": "\u02cb"})
_MARKUP = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "`": "\u02cb", "*": "\u2217", "~": "\u223c"})
#: Outside a code span: what Slack would turn into a link or a mention (a dot before a letter, as in
#: a host name; "12.0" stays), or an underscore that could open or close italics (one between two
#: letters or digits cannot, nor one with a space on both sides, as in "letters, digits and _").
_LINKABLE = re.compile(r"(?<=[^\W_])\.(?=[^\W\d_])|(?<=[:/])/|[@#](?=\w)|(?<![^\W_])_(?=\S)|(?<=\S)_(?![^\W_])")
_LINK_BREAKERS = {".": "\u2024", "/": "\u2215", "@": "@\u2060", "#": "#\u2060", "_": "\u02cd"}
_USER_ID = re.compile(r"[UW][A-Z0-9]{2,20}")
_CHANNEL_ID = re.compile(r"[CDG][A-Z0-9]{2,20}")


def escape(text: object, *, code: bool = False, limit: int = SECTION_LIMIT) -> str:
    """``text`` from a person, a file or the platform, as mrkdwn that shows it and nothing else.

    Line breaks, control and invisible characters (bidirectional overrides, zero-width ones) show
    as ``�`` (``↵`` for a line break); ``& < >`` are escaped; a backtick, ``*`` and ``~`` become
    look-alikes. With ``code``, the text comes back as an inline code span (in which Slack makes no
    link and no mention); without, dots inside words, ``//``, ``@`` and ``#`` before a word and
    underscores at a word's edge are replaced or broken, so that nothing is linked, mentioned or
    put in italics. The result, backticks included, is at most ``limit`` characters, cut with ``…``.
    """
    assert limit > 3, "room for at least one character, the backticks and …"
    raw = str(text)[:limit]  # every character comes out as one or more: no more are ever needed
    room = limit - (2 if code else 0)
    shown = _escaped(raw, code)
    while len(shown) > room:  # cut the text in proportion, leaving room for "…"
        raw = raw[: min(len(raw) - 1, len(raw) * (room - 1) // len(shown))]
        shown = _escaped(raw + "…", code)  # escaped with it: an underscore before it is at a word's edge
    return f"`{shown}`" if code else shown


def _escaped(text: str, code: bool) -> str:
    if not text.isascii() or not text.isprintable():
        text = "".join(_visible(c) for c in text)
    if code:
        return text.translate(_CODE_MARKUP)
    return _LINKABLE.sub(lambda m: _LINK_BREAKERS[m[0]], text.translate(_MARKUP))


def _visible(char: str) -> str:
    if char in "\r\n\u2028\u2029\x85":
        return "\u21b5"
    if char == "\t":
        return " "
    return "\ufffd" if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") else char


def user(user_id: str) -> str:
    """A mention of a Slack user id; anything else (``cli:root``) as plain text."""
    return f"<@{user_id}>" if _USER_ID.fullmatch(user_id or "") else escape(user_id)


def channel(channel_id: str) -> str:
    """A link to a Slack channel id; anything else as plain text."""
    return f"<#{channel_id}>" if _CHANNEL_ID.fullmatch(channel_id or "") else escape(channel_id, code=True, limit=100)


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
    approvals: Sequence[Approval] = (),
    needed: int = 1,
) -> tuple[str, Blocks]:
    """The request's message in the channel (and the copies its approvers were sent), as it
    stands now: ``approvals`` so far, of the ``needed``."""
    what = (
        f"{plural(request.count, 'device')} named by the platform"
        if request.kind == "count"
        else plural(request.count, "device name")
    )
    title = f"*Device registration #{request.id}* · product {escape(request.product_key, code=True)} · {what} · requested by {user(request.requester)}"
    blocks: Blocks = []
    if label:
        blocks.append(context(label))
    blocks.append(section(title))
    if request.justification:
        blocks.append(section(f"*Reason:* {escape(request.justification)}"))
    state_line = STATE_LINES[request.state]
    if request.state == State.REGISTERING and progress:
        state_line += f" {progress[0]} of {plural(progress[1], 'part')} done."
    if request.state in (State.APPROVED, State.REGISTERING, State.DONE, State.FAILED) and request.decided_by:
        if request.auto_approved and request.rule is not None:
            state_line += f"\nApproved by policy (at most {plural(request.rule.auto_approve_max, 'device')} for this product)."
        else:
            by = " and ".join(user(a.approver) for a in approvals) if len(approvals) > 1 else user(request.decided_by)
            state_line += f"\nApproved by {by} at {when(request.decided_at)}."
    if request.state == State.AWAITING_APPROVAL and (needed > 1 or approvals):
        state_line += "\n" + progress_line(approvals, needed)
    if request.state == State.REJECTED:
        state_line = f":no_entry_sign: Rejected by {user(request.decided_by or '')} at {when(request.decided_at)}: nothing was registered."
        if request.reason:
            state_line += f"\n>{escape(request.reason, limit=1000)}"
    if request.state == State.CANCELLED:
        state_line = f":heavy_multiplication_x: Cancelled by {user(request.decided_by or '')} at {when(request.decided_at)}: nothing was registered."
    if request.state == State.FAILED and request.reason:
        state_line += f"\n>{escape(request.reason, limit=1000)}"
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
                    button("Reject", REJECT, value, "danger"),  # opens a form for the reason: the confirmation
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


def progress_line(approvals: Sequence[Approval], needed: int) -> str:
    """``1 of 2 approvals: @bob``."""
    line = f"{len(approvals)} of {plural(needed, 'approval')}"
    if approvals:
        line += ": " + ", ".join(user(a.approver) + (f" ({escape(a.reason)})" if a.reason else "") for a in approvals)
    return line


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
    lines = (
        f"• {f'line {r.line}: ' if r.line else ''}{escape(r.value, code=True, limit=VALUE_LIMIT)}: {escape(r.reason, limit=REASON_LIMIT)}"
        for r in rejected
    )
    text = f"{plural(total, 'line')} of the list could not be used and will be skipped:"
    return text, [section(text), section(bullet_list(lines, total, more=" (all listed in the result file)"))]


def read_as_reply(encoding: str) -> tuple[str, Blocks]:
    """The list was not UTF-8 and was read in a legacy encoding: say which, and what to do if wrong."""
    text = (
        f"The list was read as {escape(encoding, limit=40)}: it is not UTF-8. If names or nicknames look wrong, "
        "save it as CSV UTF-8 (in Excel: Save As, CSV UTF-8) and upload it again."
    )
    return text, [section(text)]


def check_failed_reply(
    request: Request, invalid: Sequence[DeviceRow], invalid_total: int, valid: int, *, retried_by: str | None = None
) -> tuple[str, Blocks]:
    """The names refused, with a way to retry the rest: once retried (``request.retried_as``),
    which request carries the retry instead of the button."""
    lines = (f"• {escape(d.name, code=True, limit=VALUE_LIMIT)}: {escape(d.reason or 'refused', limit=REASON_LIMIT)}" for d in invalid)
    text = f"IoT Platform refused {plural(invalid_total, 'name')}; {plural(valid, 'name')} passed."
    blocks: Blocks = [section(text), section(bullet_list(lines, invalid_total))]
    if request.retried_as is not None:
        by = f" by {user(retried_by)}" if retried_by else ""
        blocks.append(context(f":repeat: Retried{by}: request #{request.retried_as} checks the {valid:,} valid names."))
        return text, blocks
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
        headline += f"\n>{escape(request.reason, limit=1000)}"
    blocks: Blocks = [section(headline)]
    if failed:
        lines = (f"• {escape(d.name, code=True, limit=VALUE_LIMIT)}: {escape(d.reason or 'failed', limit=REASON_LIMIT)}" for d in failed)
        blocks.append(section("*Not registered:*\n" + bullet_list(lines, summary.failed + (summary.pending if request.final else 0))))
    if created and not with_file:
        lines = (f"• {escape(d.name, code=True, limit=VALUE_LIMIT)}" + (f" · {escape(d.iot_id, limit=VALUE_LIMIT)}" if d.iot_id else "") for d in created)
        blocks.append(section("*Registered:*\n" + bullet_list(lines, summary.created)))
    notes = ["Every device's outcome is in the file below."] if with_file else []
    if request.kind == Kind.NAMES and summary.created:
        # The result does not wait for QueryPageByApplyId: the IotIds come after it (bot/reconciler.py).
        notes.append(IOT_IDS_AFTER_FILE if with_file else IOT_IDS_AFTER)
    if notes:
        blocks.append(context(" ".join(notes)))
    return headline.replace("*", ""), blocks


def notice(summary: Summary, permalink_hint: str = "") -> str:
    request = summary.request
    if request.state == State.REJECTED:
        why = f": {escape(request.reason)}" if request.reason else ""
        return (
            f"Device registration #{request.id} in product {escape(request.product_key)} ({user(request.requester)}): "
            f"rejected by {user(request.decided_by or '')}{why}. Nothing was registered.{permalink_hint}"
        )
    why = f" Reason: {escape(request.justification)}." if request.justification else ""
    return (
        f"Device registration #{request.id} in product {escape(request.product_key)} ({user(request.requester)}): "
        f"{request.state.label}. {outcome_line(summary).replace('*', '')}{why}{permalink_hint}"
    )


# -- the upload modal ------------------------------------------------------------------------------


def register_modal(
    product_key: str | None,
    metadata: dict[str, str],
    label: str = "",
    *,
    products: Sequence[tuple[str, str]] = (),
    initial: str | None = None,
    reason_required: bool = False,
) -> dict[str, Any]:
    """The modal of ``/devices register [ProductKey]``: a file, or names pasted, and a reason.

    Without ``product_key`` it starts with a product select of ``products`` (``(key, name)``),
    ``initial`` chosen. The reason is required when the product's rule says so (with a select,
    it is checked when the form is submitted)."""
    blocks: Blocks = []
    if label:
        blocks.append(context(label))
    if product_key:
        blocks.append(section(f"Register devices in product {escape(product_key, code=True)}.\nUpload a CSV or TXT file, or paste the names below."))
    else:
        options = [_option(f"{name} ({key})" if name and name != key else key, key) for key, name in products[:100]]
        select: dict[str, Any] = {
            "type": "static_select", "action_id": PRODUCT_BLOCK, "options": options,
            "placeholder": {"type": "plain_text", "text": "Choose a product"},
        }
        chosen = next((o for o in options if o["value"] == initial), None)
        if chosen:
            select["initial_option"] = chosen
        blocks.append({"type": "input", "block_id": PRODUCT_BLOCK, "label": {"type": "plain_text", "text": "Product"}, "element": select})
        if len(products) > len(options):
            blocks.append(context(f"The first {len(options)} of {len(products):,} products; for another, run `{COMMAND} register &lt;ProductKey&gt;`."))
    blocks += [
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
        reason_input("Reason for these devices", optional=not reason_required),
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


def _option(text: str, value: str) -> dict[str, Any]:
    return {"text": {"type": "plain_text", "text": text[:75]}, "value": value}


def reason_input(label: str, *, optional: bool) -> dict[str, Any]:
    return {
        "type": "input",
        "block_id": REASON_BLOCK,
        "optional": optional,
        "label": {"type": "plain_text", "text": label},
        "element": {"type": "plain_text_input", "action_id": REASON_BLOCK, "max_length": MAX_REASON},
    }


def reject_modal(request: Request, label: str = "") -> dict[str, Any]:
    """The form behind Reject: the confirmation, with a reason if the approver gives one."""
    blocks: Blocks = [context(label)] if label else []
    blocks += [
        section(f"Reject device registration #{request.id} ({plural(request.count, 'device')} in {escape(request.product_key, code=True)}, "
                f"requested by {user(request.requester)})? Nothing will be registered; this cannot be undone."),
        reason_input("Reason (shown to the requester and in the audit trail)", optional=True),
    ]
    return {
        "type": "modal",
        "callback_id": VIEW_REJECT,
        "private_metadata": json.dumps({"request": request.id}),
        "title": {"type": "plain_text", "text": "Reject registration"},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Keep it"},
        "blocks": blocks,
    }


# -- what approvers are sent directly --------------------------------------------------------------


def approver_intro(request: Request, needed: int) -> str:
    return (
        f"{user(request.requester)} asks for your approval of device registration #{request.id}"
        + (f" ({plural(needed, 'approval')} needed)." if needed > 1 else ".")
    )


def reminder_text(request: Request, approvals: Sequence[Approval], needed: int) -> str:
    return (
        f":bell: Reminder: device registration #{request.id} ({escape(request.product_key, code=True)}, {plural(request.count, 'device')}, "
        f"requested by {user(request.requester)}) still waits for approval: {progress_line(approvals, needed)}. "
        f"It expires {when(request.expires_at)}."
    )


def expired_text(request: Request) -> str:
    return (
        f":hourglass: Device registration #{request.id} expired: nobody approved it by {when(request.expires_at)}. "
        f"Nothing was registered; run `{COMMAND} register` again if the devices are still needed."
    )


def groups_mention(groups: Sequence[str]) -> str:
    return "Approvers: " + ", ".join(f"<!subteam^{g}>" for g in groups) + ", this request waits for one of you."


# -- the Home tab -------------------------------------------------------------------------------------


def home_view(
    waiting: Sequence[tuple[Request, Sequence[Approval], int]], own: Sequence[Request], label: str = ""
) -> dict[str, Any]:
    """The Home tab: what waits for this person's approval (with the buttons), and their own requests."""
    blocks: Blocks = [context(label)] if label else []
    blocks.append({"type": "header", "text": {"type": "plain_text", "text": "Waiting for your approval"}})
    if not waiting:
        blocks.append(section("Nothing waits for your approval."))
    for request, approvals, needed in waiting[:15]:
        line = (
            f"*#{request.id}* · {escape(request.product_key, code=True)} · {plural(request.count, 'device')} · "
            f"requested by {user(request.requester)} {when(request.created_at)} · {progress_line(approvals, needed)}"
        )
        if request.justification:
            line += f"\n*Reason:* {escape(request.justification)}"
        blocks.append(section(line))
        value = str(request.id)
        blocks.append({
            "type": "actions", "block_id": f"home-decide-{request.id}",
            "elements": [button("Approve", APPROVE, value, "primary"), button("Reject", REJECT, value, "danger")],
        })
    blocks.append({"type": "divider"})
    blocks.append({"type": "header", "text": {"type": "plain_text", "text": "Your recent requests"}})
    if not own:
        blocks.append(section(f"You have not asked for any registration yet: `{COMMAND} register` starts one."))
    for request in own[:10]:
        blocks.append(section(
            f"{request.state.info.emoji} *#{request.id}* · {escape(request.product_key, code=True)} · {plural(request.count, 'device')} · "
            f"*{request.state.label}* · {when(request.created_at)}"
        ))
    return {"type": "home", "blocks": blocks}


# -- ephemeral answers to /devices ----------------------------------------------------------------


def help_text() -> str:
    return "\n".join(
        [
            f"*{COMMAND}* registers IoT devices on Alibaba Cloud IoT Platform, after an approval.",
            f"• `{COMMAND} register [ProductKey]`: upload a CSV/TXT file or paste names (no ProductKey: choose one)",
            f"• `{COMMAND} register &lt;ProductKey&gt; name1 name2 …`: names right in the command",
            f"• `{COMMAND} register &lt;ProductKey&gt; --count N`: N devices named by the platform",
            "• add `--reason \"…\"` to say why (some products require it)",
            f"• `{COMMAND} status &lt;request id or ApplyId&gt;`: where a request stands",
            f"• `{COMMAND} list`: recent requests in this channel",
            f"• `{COMMAND} cancel &lt;request id&gt;`: withdraw a request before it is approved",
            f"• `{COMMAND} help`: this message",
        ]
    )


def form_not_opened(product_key: str, failure: str) -> str:
    """The answer to ``/devices register`` when Slack would not open the form."""
    return (
        f"The registration form could not be opened: Slack answered {failure}. Nothing was registered. "
        f"Run `{COMMAND} register {product_key}` again in a minute, or put the names right after it: "
        f"`{COMMAND} register {product_key} name1 name2 …`."
    )


def status_text(summary: Summary, apply_ids: Sequence[int]) -> str:
    request = summary.request
    lines = [
        f"*Request #{request.id}* · product {escape(request.product_key, code=True)} · requested by {user(request.requester)} {when(request.created_at)}",
        f"State: *{request.state.replace('_', ' ')}*" + (f": {escape(request.reason, limit=1000)}" if request.reason else ""),
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
            f"• #{request.id} · {escape(request.product_key, code=True)} · {request.state.replace('_', ' ')} · "
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
