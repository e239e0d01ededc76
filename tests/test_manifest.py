"""manifest.yml and the code agree: the command, the URLs, and exactly the scopes the code needs."""

import re
from pathlib import Path

import yaml

from bot.slack import blocks
from bot.slack.app import EVENTS_PATH

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = yaml.safe_load((ROOT / "manifest.yml").read_text(encoding="utf-8"))
SLACK_CODE = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "bot" / "slack").glob("*.py") if p.name != "fake.py")

#: The bot scope each Web API method the code calls needs (api.slack.com/methods).
SCOPE_OF = {
    "chat_postMessage": "chat:write",
    "chat_update": "chat:write",
    "chat_postEphemeral": "chat:write",
    "views_open": None,  # needs only a trigger_id
    "views_update": None,
    "views_publish": None,  # the Home tab; needs no scope of its own
    "files_upload_v2": "files:write",
    "files_getUploadURLExternal": "files:write",  # files_upload_v2's steps, made one by one
    "files_completeUploadExternal": "files:write",
    "files_info": "files:read",
    # A redelivery looks for its own earlier post: every kind of conversation a request can be in.
    "conversations_history": ("channels:history", "groups:history", "im:history", "mpim:history"),
    "conversations_replies": ("channels:history", "groups:history", "im:history", "mpim:history"),
    "conversations_open": "im:write",
    "usergroups_users_list": "usergroups:read",
    "apps_connections_open": None,  # Socket Mode: the app-level token's connections:write, no bot scope
}


def test_the_one_command_is_the_one_the_code_listens_to():
    commands = [c["command"] for c in MANIFEST["features"]["slash_commands"]]
    assert commands == [blocks.COMMAND]
    assert "@app.command(blocks.COMMAND)" in SLACK_CODE
    assert len(commands[0]) <= 32


def test_requests_go_to_the_path_the_server_serves():
    urls = [c["url"] for c in MANIFEST["features"]["slash_commands"]] + [MANIFEST["settings"]["interactivity"]["request_url"]]
    urls.append(MANIFEST["settings"]["event_subscriptions"]["request_url"])
    assert all(url.endswith(EVENTS_PATH) for url in urls)
    assert MANIFEST["settings"]["interactivity"]["is_enabled"] is True  # buttons and the modal need it


def test_scopes_are_exactly_what_the_code_calls():
    called = set(re.findall(r"client\.(\w+)\(", SLACK_CODE))
    unknown = called - SCOPE_OF.keys()
    assert not unknown, f"add the scope of {unknown} to SCOPE_OF and the manifest"
    needed = {"commands", "files:read"}
    for method in called:
        scopes = SCOPE_OF[method] or ()
        needed |= {scopes} if isinstance(scopes, str) else set(scopes)
    assert set(MANIFEST["oauth_config"]["scopes"]["bot"]) == needed


def action_ids(content) -> set[str]:
    found = set()
    if isinstance(content, dict):
        if "action_id" in content and content.get("type") == "button":
            found.add(content["action_id"])
        for value in content.values():
            found |= action_ids(value)
    elif isinstance(content, list):
        for value in content:
            found |= action_ids(value)
    return found


def test_every_button_the_bot_shows_has_a_listener():
    from datetime import datetime, timezone

    from bot.domain import Kind, Origin, Request, State, Summary

    now = datetime(2026, 1, 5, tzinfo=timezone.utc)
    request = Request(
        id=7, product_key="a1Prod", requester="U1", origin=Origin.SLACK, channel="C1", kind=Kind.NAMES, count=3,
        rejected_count=0, state=State.AWAITING_APPROVAL, reason=None, decided_by=None, decided_at=None, expires_at=now,
        retry_of=None, polls=0, phase_started_at=now, errors_in_row=0, created_at=now, updated_at=now,
    )
    waiting = blocks.anchor(request, Summary(request, 0, 0, 0, 3, 0))[1]
    done_request = dataclasses_replace(request, state=State.DONE)
    done = blocks.anchor(done_request, Summary(done_request, 3, 0, 0, 0, 0), credentials_button=True)[1]
    failed_check = blocks.check_failed_reply(request, [], 1, 2)[1]
    home = blocks.home_view([(request, [], 2)], [request])
    shown = action_ids([waiting, done, failed_check, home])
    listened = re.findall(r"on\(blocks\.(\w+),", SLACK_CODE) + re.findall(r"@app\.action\(blocks\.(\w+)\)", SLACK_CODE)
    registered = {getattr(blocks, name) for name in listened}
    assert shown == registered == set(blocks.ACTION_IDS)
    views = {getattr(blocks, name) for name in re.findall(r"@app\.view\(blocks\.(\w+)\)", SLACK_CODE)}
    assert views == set(blocks.VIEWS)


def test_the_events_the_manifest_subscribes_to_are_the_ones_the_code_listens_to():
    events = set(MANIFEST["settings"]["event_subscriptions"]["bot_events"])
    assert events == set(re.findall(r"@app\.event\(\"(\w+)\"\)", SLACK_CODE)) == {"app_home_opened"}
    assert MANIFEST["features"]["app_home"]["home_tab_enabled"] is True


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)
