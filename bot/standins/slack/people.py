r"""The people of the local Slack: :class:`Workspace` sends what Slack sends an app when people act
(signed slash commands, ``block_actions`` clicks, ``view_submission``\s, Events API callbacks), and
the pure payload builders behind it."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import requests

from bot.standins.slack.state import _interactive_elements, _public, _random_id
from bot.standins.slack.wire import FakeSlack


# ---------------------------------------------------------------------------------------------
# What Slack sends the bot: payload builders and signing


def signature_headers(body: str | bytes, secret: str, timestamp: int | str) -> dict[str, str]:
    """Slack's request signature: ``v0=`` + hex HMAC-SHA256 of ``v0:{timestamp}:{body}``.

    https://docs.slack.dev/authentication/verifying-requests-from-slack/
    """
    raw = body.encode("utf-8") if isinstance(body, str) else body
    basestring = b"v0:" + str(timestamp).encode("ascii") + b":" + raw
    digest = hmac.new(secret.encode("utf-8"), basestring, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": str(timestamp), "X-Slack-Signature": f"v0={digest}"}


def command_body(
    *,
    command: str,
    text: str,
    user_id: str,
    user_name: str,
    channel_id: str,
    channel_name: str,
    team_id: str,
    team_domain: str,
    api_app_id: str,
    response_url: str,
    trigger_id: str,
    token: str = "verification-token",
) -> str:
    """The form body of a slash command, fields in the order Slack sends them."""
    return urlencode(
        [
            ("token", token),
            ("team_id", team_id),
            ("team_domain", team_domain),
            ("channel_id", channel_id),
            ("channel_name", channel_name),
            ("user_id", user_id),
            ("user_name", user_name),
            ("command", command),
            ("text", text),
            ("api_app_id", api_app_id),
            ("is_enterprise_install", "false"),
            ("response_url", response_url),
            ("trigger_id", trigger_id),
        ]
    )


def interaction_body(payload: Mapping[str, Any]) -> str:
    """The form body of an interaction: one field, ``payload``, holding the JSON."""
    return urlencode({"payload": json.dumps(payload, separators=(",", ":"))})


def _user_object(user_id: str, name: str, team_id: str) -> dict[str, str]:
    return {"id": user_id, "username": name, "name": name, "team_id": team_id}


def block_actions_payload(
    *,
    user: Mapping[str, str],
    team: Mapping[str, str],
    api_app_id: str,
    trigger_id: str,
    action: Mapping[str, Any],
    container: Mapping[str, Any],
    channel: Mapping[str, str] | None = None,
    message: Mapping[str, Any] | None = None,
    view: Mapping[str, Any] | None = None,
    response_url: str | None = None,
    token: str = "verification-token",
) -> dict[str, Any]:
    """A ``block_actions`` payload for one action, from a message (``channel``, ``message``,
    ``response_url``) or a view (``view``). An ephemeral message's payload has no ``message``."""
    payload: dict[str, Any] = {
        "type": "block_actions",
        "user": dict(user),
        "api_app_id": api_app_id,
        "token": token,
        "container": dict(container),
        "trigger_id": trigger_id,
        "team": dict(team),
        "enterprise": None,
        "is_enterprise_install": False,
    }
    if channel is not None:
        payload["channel"] = dict(channel)
    if message is not None:
        payload["message"] = copy.deepcopy(dict(message))
    if view is not None:
        payload["view"] = copy.deepcopy(dict(view))
    payload["state"] = {"values": copy.deepcopy(view["state"]["values"]) if view is not None else {}}
    if response_url is not None:
        payload["response_url"] = response_url
    payload["actions"] = [dict(action)]
    return payload


def view_submission_payload(
    *,
    user: Mapping[str, str],
    team: Mapping[str, str],
    api_app_id: str,
    trigger_id: str,
    view: Mapping[str, Any],
    values: Mapping[str, Any],
    token: str = "verification-token",
) -> dict[str, Any]:
    """A ``view_submission`` payload: the view with ``state.values`` set to ``values``."""
    submitted = copy.deepcopy(dict(view))
    submitted["state"] = {"values": copy.deepcopy(dict(values))}
    return {
        "type": "view_submission",
        "team": dict(team),
        "user": dict(user),
        "api_app_id": api_app_id,
        "token": token,
        "trigger_id": trigger_id,
        "view": submitted,
        "response_urls": [],
        "is_enterprise_install": False,
        "enterprise": None,
    }


def plain_text_value(text: str | None) -> dict[str, Any]:
    """The state value of a ``plain_text_input``."""
    return {"type": "plain_text_input", "value": text}


def file_input_value(*files: Mapping[str, Any], omit_size: bool = False) -> dict[str, Any]:
    """The state value of a ``file_input`` holding ``files`` (from :meth:`FakeSlack.add_file`).
    ``omit_size``: leave ``size`` out, as Slack sometimes does."""
    objects = [copy.deepcopy(dict(f)) for f in files]
    if omit_size:
        for f in objects:
            f.pop("size", None)
    return {"type": "file_input", "files": objects}


def _action_for(element: Mapping[str, Any], block_id: str, value: str | None, action_ts: str) -> dict[str, Any]:
    """The ``actions[0]`` entry Slack sends when ``element`` is used."""
    kind = element.get("type")
    action: dict[str, Any] = {"action_id": element["action_id"], "block_id": block_id}
    if kind == "button":
        action["text"] = copy.deepcopy(element.get("text"))
        chosen = value if value is not None else element.get("value")
        if chosen is not None:
            action["value"] = chosen
        if element.get("style"):
            action["style"] = element["style"]
    elif kind in ("static_select", "overflow", "radio_buttons"):
        options = [o for group in element.get("option_groups", []) for o in group.get("options", [])]
        options += element.get("options", [])
        option = next((o for o in options if o.get("value") == value), None)
        if option is None:
            raise ValueError(f"{element['action_id']} has no option with value {value!r}")
        action["selected_option"] = copy.deepcopy(option)
        if kind == "static_select" and element.get("placeholder"):
            action["placeholder"] = copy.deepcopy(element["placeholder"])
    elif value is not None:
        action["value"] = value
    action["type"] = kind
    action["action_ts"] = action_ts
    return action


class Workspace:
    """People using the app: builds, signs and POSTs what Slack sends to ``app_url``.

    Each method returns the app's HTTP answer (a :class:`requests.Response`). ``clock`` gives the
    request timestamp (epoch seconds): return an old time to forge an expired request; per call,
    ``sign=False`` leaves the signature out and ``bad_signature=True`` signs with a wrong secret.
    Users and trigger ids are registered in ``fake`` so the bot's API calls about them succeed.
    """

    def __init__(
        self,
        fake: FakeSlack,
        signing_secret: str,
        app_url: str = "http://127.0.0.1:3000/slack/events",
        *,
        clock: Callable[[], float] = time.time,
        verification_token: str = "verification-token",
        timeout: float = 10.0,
    ) -> None:
        self.fake = fake
        self.signing_secret = signing_secret
        self.app_url = app_url
        self.clock = clock
        self.verification_token = verification_token
        self.timeout = timeout
        self.last_trigger_id: str | None = None
        self.last_response_url: str | None = None
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the people's actions -------------------------------------------------------------------

    def command(
        self,
        user: str,
        channel: str,
        text: str = "",
        command: str = "/devices",
        *,
        sign: bool = True,
        bad_signature: bool = False,
    ) -> requests.Response:
        """``user`` types ``command text`` in ``channel``."""
        name = self._ensure_user(user)
        info = self.fake.channel_info(channel)
        self.last_trigger_id = self.fake.issue_trigger(user)
        self.last_response_url = self.fake.response_url(channel=channel, user=user, kind="commands")
        body = command_body(
            command=command,
            text=text,
            user_id=user,
            user_name=name,
            channel_id=channel,
            channel_name=info["name"],
            team_id=self.fake.team_id,
            team_domain=self.fake.team_domain,
            api_app_id=self.fake.app_id,
            response_url=self.last_response_url,
            trigger_id=self.last_trigger_id,
            token=self.verification_token,
        )
        return self.post(body, sign=sign, bad_signature=bad_signature)

    def click(
        self,
        user: str,
        surface: Mapping[str, Any],
        action_id: str,
        value: str | None = None,
        *,
        channel: str | None = None,
        sign: bool = True,
        bad_signature: bool = False,
    ) -> requests.Response:
        """``user`` uses the element ``action_id`` on ``surface``: a message (from
        :meth:`FakeSlack.messages`, :meth:`~FakeSlack.thread` or :meth:`~FakeSlack.ephemeral`) as the
        user sees it, which may be out of date (a double click), or a view (from
        :attr:`FakeSlack.views`). ``value`` overrides a button's value or picks a select option."""
        name = self._ensure_user(user)
        block_id, element = _find_element(surface, action_id)
        self.last_trigger_id = self.fake.issue_trigger(user)
        action = _action_for(element, block_id, value, f"{self.clock():.6f}")
        common = {
            "user": _user_object(user, name, self.fake.team_id),
            "team": {"id": self.fake.team_id, "domain": self.fake.team_domain},
            "api_app_id": self.fake.app_id,
            "trigger_id": self.last_trigger_id,
            "action": action,
            "token": self.verification_token,
        }
        if surface.get("type") in ("modal", "home") and "id" in surface:
            payload = block_actions_payload(
                container={"type": "view", "view_id": surface["id"]}, view=_view_snapshot(surface), **common
            )
        else:
            ts = surface["ts"]
            if channel is None:
                found = self.fake.find_message(ts)
                if found is None:
                    raise ValueError(f"no message {ts} in the fake Slack; pass channel=")
                channel = found[0]
            info = self.fake.channel_info(channel)
            ephemeral = "user_to" in surface
            container: dict[str, Any] = {
                "type": "message",
                "message_ts": ts,
                "channel_id": channel,
                "is_ephemeral": ephemeral,
            }
            if surface.get("thread_ts"):
                container["thread_ts"] = surface["thread_ts"]
            self.last_response_url = self.fake.response_url(
                channel=channel, user=user, message_ts=ts, kind="actions"
            )
            payload = block_actions_payload(
                container=container,
                channel={"id": channel, "name": info["name"]},
                message=None if ephemeral else _public(dict(surface)),
                response_url=self.last_response_url,
                **common,
            )
        return self.post(interaction_body(payload), sign=sign, bad_signature=bad_signature)

    def event(self, user: str, event: Mapping[str, Any], *, sign: bool = True) -> requests.Response:
        """Slack's Events API delivers ``event`` (``type`` and the rest) about ``user`` to the app,
        as an ``event_callback`` (e.g. ``{"type": "app_home_opened", "tab": "home"}``)."""
        self._ensure_user(user)
        now = self.clock()
        body = {
            "token": self.verification_token,
            "team_id": self.fake.team_id,
            "api_app_id": self.fake.app_id,
            "event": {"user": user, "event_ts": f"{now:.6f}", **event},
            "type": "event_callback",
            "event_id": f"Ev{_random_id(10)}",
            "event_time": int(now),
            "authorizations": [{"team_id": self.fake.team_id, "user_id": self.fake.bot_user_id, "is_bot": True}],
        }
        return self.post(json.dumps(body), content_type="application/json", sign=sign)

    def submit_view(
        self,
        user: str,
        view: Mapping[str, Any],
        values: Mapping[str, Mapping[str, Mapping[str, Any]]],
        *,
        sign: bool = True,
        bad_signature: bool = False,
    ) -> requests.Response:
        """``user`` submits the modal ``view`` (from :attr:`FakeSlack.views`) with ``values``
        (``{block_id: {action_id: value}}``, see :func:`plain_text_value`, :func:`file_input_value`).
        Afterwards the fake applies the app's answer: an empty ack closes the modal,
        ``response_action: update`` replaces it, ``errors`` keeps it open."""
        name = self._ensure_user(user)
        _check_values(view, values)
        self.last_trigger_id = self.fake.issue_trigger(user)
        payload = view_submission_payload(
            user=_user_object(user, name, self.fake.team_id),
            team={"id": self.fake.team_id, "domain": self.fake.team_domain},
            api_app_id=self.fake.app_id,
            trigger_id=self.last_trigger_id,
            view=_view_snapshot(view),
            values=values,
            token=self.verification_token,
        )
        response = self.post(interaction_body(payload), sign=sign, bad_signature=bad_signature)
        if response.status_code == 200:
            ack: dict[str, Any] | None = None
            if response.content.strip():
                try:
                    ack = response.json()
                except ValueError:
                    ack = None
            self.fake._record_submission(str(view["id"]), dict(values), ack)
        return response

    def post(
        self,
        body: str | bytes,
        *,
        content_type: str = "application/x-www-form-urlencoded",
        sign: bool = True,
        bad_signature: bool = False,
        timestamp: int | None = None,
    ) -> requests.Response:
        """POST ``body`` to the app as Slack does, signed unless told otherwise."""
        headers = {"Content-Type": content_type, "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)"}
        if sign:
            when = int(self.clock()) if timestamp is None else timestamp
            secret = self.signing_secret + "-forged" if bad_signature else self.signing_secret
            headers.update(signature_headers(body, secret, when))
        data = body.encode("utf-8") if isinstance(body, str) else body
        return self._session.post(self.app_url, data=data, headers=headers, timeout=self.timeout)

    def _ensure_user(self, user: str) -> str:
        if not self.fake.has_user(user):
            self.fake.add_user(user)
        with self.fake._lock:
            return str(self.fake._users[user]["name"])


def _view_snapshot(view: Mapping[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in view.items()}


def _find_element(surface: Mapping[str, Any], action_id: str) -> tuple[str, dict[str, Any]]:
    seen = []
    for block in surface.get("blocks") or []:
        for element in _interactive_elements(block):
            seen.append(element.get("action_id"))
            if element.get("action_id") == action_id:
                return str(block.get("block_id")), element
    raise ValueError(f"no element with action_id {action_id!r} here; there are {seen}")


def _check_values(view: Mapping[str, Any], values: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse values Slack could not send: for blocks or actions the view does not have."""
    known = {
        str(b.get("block_id")): {e.get("action_id") for e in _interactive_elements(b)}
        for b in view.get("blocks") or []
        if isinstance(b, dict)
    }
    for block_id, actions in values.items():
        if block_id not in known:
            raise ValueError(f"the view has no block {block_id!r}; it has {sorted(known)}")
        for action_id in actions:
            if action_id not in known[block_id]:
                has = sorted(map(str, known[block_id]))
                raise ValueError(f"block {block_id!r} has no element {action_id!r}; it has {has}")
