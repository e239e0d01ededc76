"""Approvals a team can trust, as people meet them in Slack: a policy file with a rule per product,
two approvers for production, reasons, approvers asked by DM and reminded, small sandbox requests
approved by policy, the Home tab, the product picker, and a retry made once however often it is
clicked. Signed requests over HTTP to the real app, the local Slack, the emulator, a manual clock.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from support import SIGNING_SECRET, SlackScenario, buttons, slack_scenario, text_of, wait_until

from bot.config import Settings
from bot.domain import Rule, State
from bot.policy import PolicyError, load_rules
from bot.slack import blocks
from bot.slack.app import create_app
from bot.standins.slack import Workspace, plain_text_value

OPS, NOTICES = "C0OPS", "C0NOTICES"
ALICE, BOB, CAROL, DAVE, ERIN = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE", "U0ERIN"
PROD, SANDBOX, PLAIN = "a1ProdKey01", "a1Sandbox01", "a1TestProd1"

POLICY = f"""
[default]
approvers = ["{BOB}", "S0LEADS"]
approvals = 1

[products.{PROD}]
approvals = 2
reason_required = true

[products.{SANDBOX}]
auto_approve_max = 5
"""


class Scenario(SlackScenario):
    def copy_for(self, user: str, request_id: int = 1) -> dict:
        """The copy of a request ``user`` was sent by DM, as it stands now."""
        channel, ts = self.store.get(request_id).origin_data["dms"][user]
        return next(m for m in self.fake.messages(channel) if m["ts"] == ts)

    def said_to(self, user: str, channel: str = OPS) -> str:
        return self.fake.wait_for(lambda: self.fake.ephemeral(channel, user))[-1]["text"]

    def later(self, seconds: float) -> None:
        self.emulator.clock.advance(seconds)
        self.jobs.run_due()


@pytest.fixture
def scenario(make_emulator, tmp_path, store_location):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY, encoding="utf-8")
    with slack_scenario(
        Scenario, make_emulator(product_keys=(PROD, SANDBOX, PLAIN)), store_location,
        channels={OPS: {"name": "iot-ops"}, NOTICES: {"name": "iot-notices"}},
        notify_channel=NOTICES, approvers="", usergroups={"S0LEADS": [CAROL, DAVE]},
        settings={"IOTREG_POLICY": str(policy), "IOTREG_REMINDERS": "1h,4h", "IOTREG_APPROVAL_TTL": "8h"},
    ) as scenario:
        for person in (ALICE, BOB, ERIN):
            scenario.fake.add_user(person)
        yield scenario


def ask(scenario: Scenario, text: str, user: str = ALICE) -> str:
    answer = scenario.ws.command(user, OPS, text)
    assert answer.status_code == 200
    return answer.text


# -- quorum ------------------------------------------------------------------------------------


def test_production_needs_two_different_approvers_and_the_message_shows_who(scenario):
    assert "Request #1" in ask(scenario, f'register {PROD} cam-1 cam-2 --reason "line 4 cameras"')
    assert scenario.drive(1, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    assert "0 of 2 approvals" in text_of(scenario.anchor())

    scenario.ws.click(BOB, scenario.anchor(), blocks.APPROVE)
    assert "counted: 1 of 2 approvals" in scenario.said_to(BOB)
    scenario.jobs.run_due()
    assert scenario.store.get(1).state == State.AWAITING_APPROVAL
    assert f"1 of 2 approvals: <@{BOB}>" in text_of(scenario.anchor())

    # The only approver so far clicks again: it does not count twice.
    scenario.ws.click(BOB, scenario.anchor(), blocks.APPROVE)
    assert wait_until(lambda: len(scenario.fake.ephemeral(OPS, BOB)) == 2)
    assert "counts once per person" in scenario.said_to(BOB)
    assert scenario.store.get(1).state == State.AWAITING_APPROVAL and len(scenario.bot.workflow.requests.approvals(1)) == 1

    scenario.ws.click(CAROL, scenario.anchor(), blocks.APPROVE)  # through the S0LEADS group
    assert scenario.wait_state(1, State.APPROVED, State.REGISTERING) != State.AWAITING_APPROVAL
    assert scenario.drive(1, State.DONE) == State.DONE
    anchor = text_of(scenario.anchor())
    assert f"Approved by <@{BOB}> and <@{CAROL}>" in anchor and "line 4 cameras" in anchor
    assert "Reason: line 4 cameras" in scenario.fake.messages(NOTICES)[-1]["text"]
    events = [(e.actor, e.event, e.detail) for e in scenario.store.audit(1)]
    assert events[0][1] == "requested" and events[0][2]["rule"] == f"products.{PROD}" and events[0][2]["reason"] == "line 4 cameras"
    assert [(a, e) for a, e, _ in events if e in ("approval", "approved")] == [(BOB, "approval"), (CAROL, "approval"), (CAROL, "approved")]


def test_twenty_concurrent_clicks_make_exactly_one_approval_of_two(scenario):
    ask(scenario, f'register {PROD} pump-1 pump-2 pump-3 --reason "spares"')
    scenario.drive(1, State.AWAITING_APPROVAL)
    anchor = scenario.anchor()
    clickers = [(BOB, CAROL, DAVE)[i % 3] for i in range(20)]

    def click(user: str) -> int:
        with Workspace(scenario.fake, SIGNING_SECRET, app_url=scenario.ws.app_url) as ws:
            return ws.click(user, anchor, blocks.APPROVE).status_code

    with ThreadPoolExecutor(20) as pool:
        assert set(pool.map(click, clickers)) == {200}
    assert scenario.wait_state(1, State.APPROVED) == State.APPROVED
    answered = lambda: sum(len(scenario.fake.ephemeral(OPS, u)) for u in (BOB, CAROL, DAVE))  # noqa: E731
    assert wait_until(lambda: answered() >= 19)  # every click but the one that completed the quorum hears why
    audit = scenario.store.audit(1)
    assert len([e for e in audit if e.event == "approval"]) == 2
    assert len([e for e in audit if e.event == "approved"]) == 1
    assert scenario.drive(1, State.DONE) == State.DONE
    assert len(scenario.emulator.backend.devices(PROD)) == 3
    assert [e.kind for e in scenario.store.delivered_events(1)].count("approved") == 1


# -- reasons -----------------------------------------------------------------------------------


def test_a_required_reason_is_asked_for_in_the_command_and_in_the_form(scenario):
    answer = ask(scenario, f"register {PROD} cam-1 cam-2")
    assert "need a reason" in answer and "--reason" in answer
    assert scenario.store.get(1) is None  # nothing was requested

    ask(scenario, f"register {PROD}")
    form = scenario.fake.wait_for(lambda: next(iter(scenario.fake.views.values()), None))
    reason_block = next(b for b in form["blocks"] if b.get("block_id") == blocks.REASON_BLOCK)
    assert reason_block["optional"] is False
    names = {blocks.NAMES_BLOCK: {blocks.NAMES_BLOCK: plain_text_value("cam-1\ncam-2")}}
    refused = scenario.ws.submit_view(ALICE, form, names)
    assert refused.json()["response_action"] == "errors" and blocks.REASON_BLOCK in refused.json()["errors"]
    assert scenario.store.get(1) is None

    given = {**names, blocks.REASON_BLOCK: {blocks.REASON_BLOCK: plain_text_value("new cameras for line 4")}}
    assert not scenario.ws.submit_view(ALICE, form, given).content.strip()
    request = scenario.request(1)
    assert request.justification == "new cameras for line 4" and request.rule.approvals == 2
    scenario.drive(1, State.AWAITING_APPROVAL)
    assert "*Reason:* new cameras for line 4" in text_of(scenario.anchor())


# -- approvers are told, reminded; expiry ----------------------------------------------------------


def test_every_approver_gets_a_dm_whose_buttons_work_and_every_copy_follows_the_request(scenario):
    ask(scenario, f"register {PLAIN} valve-1 valve-2")
    scenario.drive(1, State.AWAITING_APPROVAL)
    for person in (BOB, CAROL, DAVE):  # named, and the members of S0LEADS
        copy = scenario.copy_for(person)
        assert set(buttons(copy)) == {blocks.APPROVE, blocks.REJECT}
        assert f"<@{ALICE}> asks for your approval of device registration #1" in text_of(copy)
    assert not scenario.fake.dm(ALICE)  # the requester is not asked to approve their own request

    scenario.ws.click(DAVE, scenario.copy_for(DAVE), blocks.APPROVE)  # from the DM, as from the channel
    assert scenario.wait_state(1, State.APPROVED) == State.APPROVED
    scenario.jobs.run_due()
    for person in (BOB, CAROL, DAVE):
        copy = scenario.copy_for(person)
        assert not buttons(copy) and f"Approved by <@{DAVE}>" in text_of(copy)
    assert not buttons(scenario.anchor())


def test_big_groups_are_mentioned_in_the_thread_instead_of_messaged_one_by_one(scenario):
    scenario.fake.usergroups["S0LEADS"] = [f"U0LEAD{i:03d}" for i in range(25)]
    for member in scenario.fake.usergroups["S0LEADS"]:
        scenario.fake.add_user(member)
    ask(scenario, f"register {PLAIN} valve-1")
    scenario.drive(1, State.AWAITING_APPROVAL)
    assert set(scenario.store.get(1).origin_data["dms"]) == {BOB}
    assert any("<!subteam^S0LEADS>" in text_of(r) for r in scenario.replies(1))


def test_reminders_go_to_approvers_who_have_not_acted_and_expiry_tells_the_thread_and_the_requester(scenario):
    ask(scenario, f'register {PROD} gate-1 --reason "new gate"')
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.ws.click(BOB, scenario.anchor(), blocks.APPROVE)
    wait_until(lambda: len(scenario.bot.workflow.requests.approvals(1)) == 1)
    dms = {p: len(scenario.fake.dm(p)) for p in (BOB, CAROL, DAVE)}

    scenario.later(3599)
    assert {p: len(scenario.fake.dm(p)) for p in dms} == dms  # not yet
    scenario.later(2)
    assert len(scenario.fake.dm(BOB)) == dms[BOB]  # Bob acted
    for person in (CAROL, DAVE):
        assert len(scenario.fake.dm(person)) == dms[person] + 1
        assert "Reminder: device registration #1" in scenario.fake.dm(person)[-1]["text"]
    scenario.later(3 * 3600)
    assert all(len(scenario.fake.dm(p)) == dms[p] + 2 for p in (CAROL, DAVE))
    assert [e.event for e in scenario.store.audit(1)].count("reminded") == 2

    scenario.later(4 * 3600)
    assert scenario.store.get(1).state == State.EXPIRED
    assert "expired: nobody approved it" in text_of(scenario.replies(1)[-1])
    assert "expired: nobody approved it" in scenario.fake.dm(ALICE)[-1]["text"]
    assert all(not buttons(scenario.copy_for(p)) for p in (BOB, CAROL, DAVE))
    assert not buttons(scenario.anchor())


# -- auto-approval ---------------------------------------------------------------------------------


def test_a_small_sandbox_request_is_approved_by_policy_and_a_bigger_one_waits(scenario):
    assert "Request #1" in ask(scenario, f"register {SANDBOX} --count 5")
    assert scenario.drive(1, State.DONE) == State.DONE
    anchor = scenario.anchor(1)
    assert blocks.APPROVE not in buttons(anchor)
    assert "Approved by policy (at most 5 devices for this product)" in text_of(anchor)
    approved = [e for e in scenario.store.audit(1) if e.event == "approved"]
    assert approved[0].detail == {"by_policy": 5, "rule": f"products.{SANDBOX}"}
    assert not scenario.fake.dm(BOB)  # nobody was asked

    ask(scenario, f"register {SANDBOX} sbx-0001 sbx-0002 sbx-0003")  # names: checked first, then approved by policy
    assert scenario.drive(2, State.DONE) == State.DONE
    assert "Approved by policy" in text_of(scenario.anchor(2))

    ask(scenario, f"register {SANDBOX} --count 6")
    assert scenario.drive(3, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    assert set(buttons(scenario.anchor(3))) == {blocks.APPROVE, blocks.REJECT}
    assert len(scenario.emulator.backend.devices(SANDBOX)) == 8


# -- the Home tab ------------------------------------------------------------------------------------


def test_the_home_tab_shows_an_approver_what_waits_and_a_requester_their_requests(scenario):
    ask(scenario, f"register {PLAIN} valve-1 valve-2")
    scenario.drive(1, State.AWAITING_APPROVAL)
    ask(scenario, f"register {SANDBOX} --count 2")
    scenario.drive(2, State.DONE)

    assert scenario.ws.event(CAROL, {"type": "app_home_opened", "tab": "home", "channel": "D0CAROL"}).status_code == 200
    home = scenario.fake.wait_for(lambda: scenario.fake.home(CAROL))
    assert "#1" in text_of(home) and "#2" not in text_of(home).split("Your recent requests")[0]
    scenario.ws.click(CAROL, home, blocks.APPROVE)
    assert scenario.wait_state(1, State.APPROVED) == State.APPROVED
    assert wait_until(lambda: "Nothing waits for your approval" in text_of(scenario.fake.home(CAROL)))

    scenario.ws.event(ALICE, {"type": "app_home_opened", "tab": "home", "channel": "D0ALICE"})
    home = scenario.fake.wait_for(lambda: scenario.fake.home(ALICE))
    mine = text_of(home).split("Your recent requests")[1]
    assert "*#1*" in mine and "*approved*" in mine and "*#2*" in mine and "*done*" in mine
    assert not buttons(home)  # nothing waits for Alice's approval: she asked for #1 herself


# -- the product picker ------------------------------------------------------------------------------


def test_register_without_a_product_offers_the_products_with_the_last_one_used_here_chosen(scenario):
    ask(scenario, f"register {SANDBOX} --count 1")
    ask(scenario, "register")
    form = scenario.fake.wait_for(lambda: next(iter(scenario.fake.views.values()), None))
    select = next(b for b in form["blocks"] if b.get("block_id") == blocks.PRODUCT_BLOCK)["element"]
    assert [o["value"] for o in select["options"]] == [PROD, SANDBOX, PLAIN]
    assert select["initial_option"]["value"] == SANDBOX
    chosen = {
        blocks.PRODUCT_BLOCK: {blocks.PRODUCT_BLOCK: {"type": "static_select", "selected_option": select["options"][2]}},
        blocks.NAMES_BLOCK: {blocks.NAMES_BLOCK: plain_text_value("door-1\ndoor-2")},
    }
    assert not scenario.ws.submit_view(ALICE, form, chosen).content.strip()
    assert scenario.request(2).product_key == PLAIN and scenario.request(2).count == 2


# -- retry exactly once ------------------------------------------------------------------------------


def test_four_clicks_on_retry_make_one_retry_request_and_the_button_is_replaced(scenario):
    scenario.emulator.backend.add_device(PLAIN, "cam-0002")
    ask(scenario, f"register {PLAIN} cam-0001 cam-0002 cam-0003")
    assert scenario.drive(1, State.CHECK_FAILED, State.AWAITING_APPROVAL) == State.CHECK_FAILED
    reply = scenario.replies(1)[-1]
    checks = scenario.emulator.gateway.calls["BatchCheckDeviceNames"]

    def click(_: int) -> int:
        with Workspace(scenario.fake, SIGNING_SECRET, app_url=scenario.ws.app_url) as ws:
            return ws.click(ALICE, reply, blocks.RETRY_VALID).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(click, range(4))) == [200] * 4
    assert wait_until(lambda: len(scenario.fake.ephemeral(OPS, ALICE)) >= 4)
    told = [m["text"] for m in scenario.fake.ephemeral(OPS, ALICE)]
    # (PostgreSQL may hand a losing click's rolled-back insert a number: the retry's is not always #2.)
    retry = scenario.store.get(1).retried_as
    assert sum(f"Request #{retry} checks the 2 valid names" in t for t in told) == 1, told
    assert sum(f"retried already: request #{retry}" in t for t in told) == 3
    assert [r.id for r in scenario.store.requests(limit=None)] == [retry, 1]
    updated = next(m for m in scenario.replies(1) if m["ts"] == reply["ts"])
    assert blocks.RETRY_VALID not in buttons(updated) and f"request #{retry} checks the 2 valid names" in text_of(updated)
    scenario.drive(retry, State.AWAITING_APPROVAL)
    assert scenario.emulator.gateway.calls["BatchCheckDeviceNames"] == checks + 1


# -- the policy file ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("[default]\napprovals = 2\n[products.a1ProdKey01]\napprovals = \n", 4, "not valid TOML"),
        ("[default]\napprovals = 2\n\n[products.a1ProdKey01]\nquorum = 2\n", 5, "unknown key 'quorum'"),
        ("[default]\napprovers = [\"U0BOB\"]\napprovals = 0\n", 3, "approvals must be a whole number of at least 1"),
        ("[default]\napprovers = [\"bob\"]\n", 2, "approvers must be a list of Slack user ids"),
        ("[defaults]\napprovals = 2\n", 1, "unknown section [defaults]"),
    ],
)
def test_a_bad_policy_file_is_refused_with_its_line_and_what_is_wrong(tmp_path, text, where, what):
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as refused:
        load_rules(path, Rule())
    assert str(refused.value).startswith(f"{path}:{where}: ") and what in str(refused.value)


def test_a_product_overrides_the_default_key_by_key_and_without_a_file_todays_settings_apply(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY, encoding="utf-8")
    default, products = load_rules(path, Rule(self_approval=True))
    assert default == Rule(approvers=(BOB, "S0LEADS"), approvals=1, self_approval=True, source="default")
    assert products[PROD] == Rule(approvers=(BOB, "S0LEADS"), approvals=2, self_approval=True, reason_required=True, source=f"products.{PROD}")
    assert products[SANDBOX].auto_approve_max == 5 and products[SANDBOX].approvals == 1

    from bot import wiring

    settings = Settings.from_env({"IOTREG_APPROVERS": BOB, "IOTREG_ALLOW_SELF_APPROVAL": "true"})
    assert wiring.rules(settings) == (Rule(approvers=(BOB,), self_approval=True, source="settings"), {})


def test_the_bot_does_not_start_on_a_bad_policy_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("[default]\nself_approval = \"yes\"\n", encoding="utf-8")
    settings = Settings.from_env({
        "SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s", "ALIBABA_CLOUD_ACCESS_KEY_ID": "k",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "s", "IOTREG_POLICY": str(path), "IOTREG_DB": str(tmp_path / "db"),
    })
    with pytest.raises(PolicyError, match=r"policy.toml:2: self_approval must be true or false"):
        create_app(settings)


def test_approvals_from_many_processes_at_once_complete_the_quorum_exactly_once(store_location):
    """Twenty approvers clicking at once, each through a store of its own on one database (as
    replicas would), SQLite and PostgreSQL: two approvals are needed, exactly one completes the quorum."""
    from datetime import datetime, timezone

    from bot.domain import Kind, Origin, Tally
    from bot.store import open_store

    now = datetime(2026, 1, 5, tzinfo=timezone.utc)
    first = open_store(store_location)
    request_id = first.create_request(
        product_key=PROD, requester=ALICE, origin=Origin.SLACK, kind=Kind.COUNT, count=3,
        state=State.AWAITING_APPROVAL, now=now, chunks=[3], rule=Rule(approvals=2),
    )
    stores = [open_store(store_location) for _ in range(20)]

    def approve(index: int) -> Tally:
        return stores[index].add_approval(request_id, approver=f"U0APP{index % 7:03d}", now=now, needed=2)

    with ThreadPoolExecutor(20) as pool:
        tallies = list(pool.map(approve, range(20)))
    assert tallies.count(Tally.QUORUM) == 1 and tallies.count(Tally.COUNTED) == 1
    assert set(tallies) <= {Tally.QUORUM, Tally.COUNTED, Tally.ALREADY_COUNTED, Tally.CLOSED}
    assert first.get(request_id).state == State.APPROVED and len(first.approvals(request_id)) == 2
    assert [e.kind for e in first.pending_events()].count("approved") == 1
    for store in [first, *stores]:
        store.close()


def test_someone_who_may_not_reject_gets_no_form_and_the_requester_withdrawing_updates_every_copy(scenario):
    ask(scenario, f"register {PLAIN} valve-1")
    scenario.drive(1, State.AWAITING_APPROVAL)
    scenario.ws.click(ERIN, scenario.anchor(), blocks.REJECT)
    assert "not one of the approvers" in scenario.said_to(ERIN)
    assert not any(v["callback_id"] == blocks.VIEW_REJECT for v in scenario.fake.views.values())

    scenario.ws.click(ALICE, scenario.anchor(), blocks.REJECT)  # the requester's Reject withdraws
    form = scenario.fake.wait_for(lambda: next((v for v in scenario.fake.views.values() if v["callback_id"] == blocks.VIEW_REJECT), None))
    scenario.ws.submit_view(ALICE, form, {})
    assert scenario.wait_state(1, State.CANCELLED) == State.CANCELLED
    scenario.jobs.run_due()
    for person in (BOB, CAROL, DAVE):
        copy = scenario.copy_for(person)
        assert not buttons(copy) and f"Cancelled by <@{ALICE}>" in text_of(copy)


def test_iotreg_serve_stops_at_once_on_a_bad_policy_file_and_says_where(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bot.cli import cli

    path = tmp_path / "policy.toml"
    path.write_text(f"[default]\napprovers = [\"{BOB}\"]\n\n[products.{PROD}]\nquorum = 2\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # no .env here
    env = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s", "IOTREG_POLICY": str(path), "IOTREG_DB": str(tmp_path / "db")}
    result = CliRunner().invoke(cli, ["serve", "--emulator"], env=env)
    assert result.exit_code == 1
    assert f"{path}:5: unknown key 'quorum' in [products.{PROD}]" in result.output and "Traceback" not in result.output


def test_iotreg_audit_shows_the_rule_and_every_reason(tmp_path, monkeypatch):
    from datetime import datetime, timezone

    from click.testing import CliRunner

    from bot.cli import cli
    from bot.domain import Kind, Origin
    from bot.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "audit.db")
    now = datetime(2026, 1, 5, tzinfo=timezone.utc)
    request_id = store.create_request(
        product_key=PROD, requester=ALICE, origin=Origin.SLACK, kind=Kind.COUNT, count=2, state=State.AWAITING_APPROVAL,
        now=now, chunks=[2], rule=Rule(approvals=2, source=f"products.{PROD}"), justification="spares for line 4",
    )
    store.transition(
        request_id, from_states=[State.AWAITING_APPROVAL], to_state=State.REJECTED, actor=BOB, event="rejected", now=now,
        detail={"reason": "use the sandbox first"},
    )
    store.close()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["audit", str(request_id)], env={"IOTREG_DB": str(tmp_path / "audit.db")})
    assert result.exit_code == 0, result.output
    assert f"rule=products.{PROD}" in result.output and "reason=spares for line 4" in result.output
    assert "reason=use the sandbox first" in result.output
