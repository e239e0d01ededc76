"""Nobody's decision waits behind slow work.

Uploaded lists are downloaded and read in a pool of their own, two at a time; clicks, ``/devices``
answers and cancels run in another that nothing slow is ever given. Here Slack's file host holds
every download until the test releases it, so the uploads are "slow" for as long as the test
wants, and an approval, a cancel and a status answer must all go through meanwhile.
"""

from __future__ import annotations

import pytest
from support import SlackScenario, slack_scenario, wait_until

from bot.domain import State
from bot.slack import blocks
from bot.standins.slack import file_input_value

OPS, NOTICES = "C0OPS", "C0NOTICES"
ALICE, BOB, CAROL = "U0ALICE", "U0BOB", "U0CAROL"


@pytest.fixture
def scenario(make_emulator, store_location):
    with slack_scenario(
        SlackScenario, make_emulator(check_seconds=2, create_seconds=3), store_location,
        channels={OPS: {"name": "iot-ops"}, NOTICES: {"name": "iot-notices"}},
        notify_channel=NOTICES, approvers=BOB,
    ) as scenario:
        yield scenario


def names(prefix: str, n: int) -> bytes:
    return ("DeviceName\n" + "".join(f"{prefix}-{i:04d}\n" for i in range(n))).encode()


def submit_upload(scenario: SlackScenario, user: str, content: bytes) -> None:
    fake, ws = scenario.fake, scenario.ws
    opened = len(fake.views)
    assert ws.command(user, OPS, f"register {scenario.emulator.product_key}").status_code == 200
    view = fake.wait_for(lambda: len(fake.views) > opened and list(fake.views.values())[-1])
    file = fake.add_file(content, name="list.csv", filetype="csv", mimetype="text/csv")
    answer = ws.submit_view(user, view, {blocks.FILE_BLOCK: {blocks.FILE_BLOCK: file_input_value(file)}})
    assert answer.status_code == 200


def test_an_approval_goes_through_while_uploads_are_still_downloading(scenario):
    fake = scenario.fake
    submit_upload(scenario, ALICE, names("first", 3))
    assert scenario.drive(1, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    anchor = next(m for m in fake.messages(OPS) if m["ts"] == scenario.store.get(1).origin_data.get("thread_ts"))

    downloads = fake.hold("files.download")  # from here on Slack's file host answers nobody
    try:
        approved_while_downloading(scenario, anchor, downloads)
    finally:
        downloads.release()  # the uploads go on, and none is lost
    assert wait_until(lambda: all(scenario.store.get(n) is not None for n in (2, 3, 4, 5)))
    assert sorted(scenario.store.get(n).requester for n in (2, 3, 4, 5)) == [ALICE, ALICE, CAROL, CAROL]


def approved_while_downloading(scenario: SlackScenario, anchor: dict, downloads) -> None:
    fake, ws = scenario.fake, scenario.ws
    for user in (ALICE, CAROL, ALICE, CAROL):
        submit_upload(scenario, user, names(f"slow-{user}", 5))
    fake.wait_for(lambda: downloads.waiting == 2)  # two reads at a time: memory stays bounded

    ws.click(BOB, anchor, blocks.APPROVE)
    # Acted upon within a second although every slow worker is stuck in a download.
    assert wait_until(lambda: scenario.store.get(1).state != State.AWAITING_APPROVAL, timeout=1.0)
    assert scenario.store.get(1).state == State.APPROVED
    before = len(fake.responses)
    assert ws.command(BOB, OPS, "cancel 1").status_code == 200
    assert "cannot be cancelled" in fake.wait_for(lambda: fake.responses[before:] and fake.responses[before].payload["text"], timeout=1.0)
    assert downloads.waiting == 2 and scenario.store.get(2) is None  # the uploads are still waiting
