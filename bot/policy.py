"""Who may do what to a request, and what is announced at each event: decided here, for every front end.

Front ends ask and render the answer; none of them decides. Whether someone is an approver is a
question for a :class:`Membership` (the Slack front end answers it from user ids and user groups,
the CLI from the person at the terminal): the rules built on that answer are the core's.

* Approve: an approver, and not the requester unless self-approval is allowed.
* Reject: an approver; the requester's Reject withdraws (cancels) their own request, unless
  self-approval is allowed.
* Cancel, retry the valid names: the requester or an approver.
* Receive device credentials: the requester, whoever decided, or an approver (when approvers are named).

Which approvers, how many of them, and whether a reason is needed is a :class:`~bot.domain.Rule`:
one default and one per product, from the TOML file ``IOTREG_POLICY`` names (:func:`load_rules`)
or, without it, from ``IOTREG_APPROVERS`` and ``IOTREG_ALLOW_SELF_APPROVAL``. A request keeps the
rule it was submitted under.
"""


from __future__ import annotations

import dataclasses
import enum
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from bot.domain import Action, Event, EventKind, Request, Rule


class Membership(Protocol):
    """Whether someone is an approver."""

    @property
    def anyone(self) -> bool:
        """No approver is named: anyone may approve."""

    def why_not(self, user: str) -> str | None:
        """``None`` if ``user`` is an approver; otherwise why not, in words for them."""


class Everyone:
    """The membership where anyone is an approver (the CLI's person at the terminal)."""

    anyone = True

    def why_not(self, user: str) -> str | None:
        return None


class Why(enum.StrEnum):
    """Why an action was refused; front ends word it."""

    REQUESTER = "requester"  # the requester may not approve their own request
    NOT_APPROVER = "not an approver"
    NOT_REQUESTER_OR_APPROVER = "not the requester or an approver"
    NOT_ENTITLED = "not entitled to the credentials"


@dataclasses.dataclass(frozen=True)
class Denial:
    """A refusal: ``why``, and ``detail`` from the membership when it had something to say."""

    action: Action
    why: Why
    detail: str | None = None


class Policy:
    """The rules, and who may do what under them.

    ``approvers`` answers "is this person an approver?" when no ``membership`` is given (the CLI's
    person at the terminal); ``membership`` makes that answer for a rule's own list of approvers.
    Without ``default``, the default rule is one approval, self-approval as ``allow_self_approval``.
    """

    def __init__(
        self,
        approvers: Membership | None = None,
        allow_self_approval: bool = False,
        *,
        default: Rule | None = None,
        products: Mapping[str, Rule] | None = None,
        membership: Callable[[Sequence[str]], Membership] | None = None,
    ) -> None:
        self.approvers = approvers or Everyone()
        self.default = default or Rule(self_approval=allow_self_approval)
        self.products = MappingProxyType(dict(products or {}))
        self.membership = membership

    @property
    def allow_self_approval(self) -> bool:
        return self.default.self_approval

    def rule_for(self, product_key: str) -> Rule:
        """The rule a request for ``product_key`` submitted now is decided under."""
        return self.products.get(product_key, self.default)

    def rule_of(self, request: Request) -> Rule:
        """The rule ``request`` was submitted under."""
        return request.rule or self.rule_for(request.product_key)

    def members(self, rule: Rule) -> Membership:
        return self.approvers if self.membership is None else self.membership(rule.approvers)

    def check(self, action: Action, request: Request, actor: str) -> Denial | None:
        """``None`` when ``actor`` may do ``action`` to ``request``; otherwise the :class:`Denial`."""
        rule = self.rule_of(request)
        members = self.members(rule)
        if action is Action.APPROVE:
            detail = members.why_not(actor)
            if detail is not None:
                return Denial(action, Why.NOT_APPROVER, detail)
            if actor == request.requester and not rule.self_approval:
                return Denial(action, Why.REQUESTER)
            return None
        if action is Action.REJECT:
            if self.withdraws(request, actor):
                return None
            detail = members.why_not(actor)
            return None if detail is None else Denial(action, Why.NOT_APPROVER, detail)
        if action in (Action.CANCEL, Action.RETRY):
            if actor == request.requester or members.why_not(actor) is None:
                return None
            return Denial(action, Why.NOT_REQUESTER_OR_APPROVER)
        if action is Action.CREDENTIALS:
            if actor in (request.requester, request.decided_by):
                return None
            if not members.anyone and members.why_not(actor) is None:
                return None
            return Denial(action, Why.NOT_ENTITLED)
        raise ValueError(f"no rule for {action}")

    def withdraws(self, request: Request, actor: str) -> bool:
        """The requester's Reject means they withdraw their own request: it is cancelled (unless
        they may decide on it themselves, when it is a rejection like anyone's)."""
        return actor == request.requester and not self.rule_of(request).self_approval


# -- the policy file -----------------------------------------------------------------------------


class PolicyError(ValueError):
    """The policy file is wrong: the message is ``file:line: what``."""


#: The keys of a rule in the policy file, and what each must be.
RULE_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "approvers": "a list of Slack user ids (U…) and user group ids (S…)",
        "approvals": "a whole number of at least 1",
        "self_approval": "true or false",
        "reason_required": "true or false",
        "auto_approve_max": "a whole number of at least 0",
    }
)
APPROVER_ID = re.compile(r"[UWS][A-Z0-9]{2,}")


def load_rules(path: str | Path, base: Rule) -> tuple[Rule, dict[str, Rule]]:
    """The default rule and the per-product rules of the TOML file at ``path``.

    ``[default]`` overrides ``base`` (today's settings) key by key, and each ``[products.KEY]``
    overrides the default key by key. Raises :class:`PolicyError` (``file:line: what``) for a
    file that is missing or malformed, an unknown key or a bad value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_in_message(str(exc))
        raise PolicyError(f"{path}:{line or 1}: not valid TOML ({str(exc).split(' (at line')[0]})") from None
    lines = text.splitlines()

    def fail(section: str, key: str | None, what: str) -> PolicyError:
        return PolicyError(f"{path}:{_line_of(lines, section, key)}: {what}")

    for name in data:
        if name not in ("default", "products"):
            raise fail(name, None, f"unknown section [{name}]; the sections are [default] and [products.<ProductKey>]")
    default_table = data.get("default", {})
    if not isinstance(default_table, dict):
        raise fail("default", None, "[default] must be a table of rule keys")
    default = _rule(default_table, base, "default", fail)
    products: dict[str, Rule] = {}
    product_tables = data.get("products", {})
    if not isinstance(product_tables, dict):
        raise fail("products", None, "products must be tables such as [products.a1BwAGVxxxx]")
    for key, table in product_tables.items():
        section = f"products.{key}"
        if not re.fullmatch(r"[A-Za-z0-9]{4,32}", key):
            raise fail(section, None, f"{key!r} is not a ProductKey (4 to 32 letters and digits)")
        if not isinstance(table, dict):
            raise fail(section, None, f"[{section}] must be a table of rule keys")
        products[key] = _rule(table, default, section, fail)
    return default, products


def _rule(table: dict[str, Any], base: Rule, section: str, fail: Callable[[str, str | None, str], PolicyError]) -> Rule:
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in RULE_KEYS:
            raise fail(section, key, f"unknown key {key!r} in [{section}]; the keys are {', '.join(RULE_KEYS)}")
        good = {
            "approvers": isinstance(value, list) and all(isinstance(v, str) and APPROVER_ID.fullmatch(v) for v in value),
            "approvals": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            "auto_approve_max": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        }.get(key, isinstance(value, bool))
        if not good:
            raise fail(section, key, f"{key} must be {RULE_KEYS[key]}, not {value!r}")
        values[key] = tuple(value) if key == "approvers" else value
    return dataclasses.replace(base, **values, source=section)


def _line_of(lines: list[str], section: str, key: str | None) -> int:
    """The line of ``key`` in ``[section]`` (or of the section's header): for the error message."""
    header = re.compile(r"\s*\[\s*" + r"\s*\.\s*".join(re.escape(p) for p in section.split(".")) + r"\s*\]")
    start = next((n for n, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return 1
    if key is None:
        return start + 1
    for n in range(start + 1, len(lines)):
        if lines[n].lstrip().startswith("["):
            break
        if re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", lines[n]):
            return n + 1
    return start + 1


def _line_in_message(message: str) -> int | None:
    found = re.search(r"at line (\d+)", message)
    return int(found[1]) if found else None


class Announcement(enum.StrEnum):
    """What a front end announces about a request. Each is carried out once per event."""

    MESSAGE = "anchor"  # the request's own message, posted once and kept current
    ASK_APPROVERS = "ask_approvers"  # each approver the request needs is asked directly
    APPROVER_COPIES = "approver_copies"  # the copies the approvers were sent, kept current
    REMIND = "remind"  # the approvers who have not acted yet are reminded
    EXPIRY = "expiry"  # the thread and the requester hear that nobody approved in time
    READ_AS = "read_as"  # the list was not UTF-8: which encoding it was read in
    SKIPPED_LINES = "skipped"  # the lines of the list refused locally
    CHECK_FAILED = "check_failed"  # the names the platform refused, and a way to retry the rest
    RESULT = "result"  # what became of every device
    RESULT_FILE = "result_file"  # the same as a file, when the list is long
    NOTICE = "notice"  # one line in the team's channel


#: The events after which the approvers' copies of a request are out of date.
DECIDING_EVENTS = frozenset(
    {EventKind.APPROVAL, EventKind.APPROVED, EventKind.REJECTED, EventKind.CANCELLED, EventKind.EXPIRED}
)


def announcements(event: Event, request: Request) -> list[Announcement]:
    """What is announced at ``event``, in order."""
    if event.kind is EventKind.REMINDER:
        return [Announcement.REMIND]
    said = [Announcement.MESSAGE]
    if event.kind is EventKind.CREATED and event.payload.get("read_as"):
        said.append(Announcement.READ_AS)
    if event.kind is EventKind.CREATED and request.rejected_count:
        said.append(Announcement.SKIPPED_LINES)
    if event.kind is EventKind.CHECK_FAILED:
        said.append(Announcement.CHECK_FAILED)
    if event.kind is EventKind.AWAITING_APPROVAL:
        said.append(Announcement.ASK_APPROVERS)
    if event.kind in DECIDING_EVENTS:
        said.append(Announcement.APPROVER_COPIES)
    if event.kind is EventKind.EXPIRED:
        said.append(Announcement.EXPIRY)
    if event.kind is EventKind.REJECTED:
        said.append(Announcement.NOTICE)
    if event.kind is EventKind.FINISHED:
        said += [Announcement.RESULT, Announcement.RESULT_FILE, Announcement.NOTICE]
    return said
