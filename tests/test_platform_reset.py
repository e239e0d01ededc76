"""When the platform forgets what iotreg remembers: an emulator started again beside a kept
database, as a new user does. An ApplyId that another request already holds, or a stored ApplyId
the platform no longer knows (``iot.device.DeviceApplyIsNotFound``), fails that request with a
reason that says what happened, at once; every other request goes on, and nothing crash-loops.
"""

from __future__ import annotations

import logging

from test_workflow import ALICE, BOB, Harness, names

from bot.domain import State, Timing

TIMING = Timing(poll_interval=1.0, poll_max_interval=4.0, approval_ttl=3600, phase_timeout=600)


def restart_platform(harness: Harness, make_emulator, **options: object) -> None:
    """The platform (an emulator) starts again with nothing in it; iotreg restarts on its database."""
    harness.emulator = make_emulator(clock=harness.clock, **options)
    harness.restart()


def test_an_apply_id_another_request_holds_fails_only_the_request_that_got_it(make_emulator, tmp_path, caplog):
    # Seeded emulators hand out the same ApplyIds at every start: the old crash-loop's cause.
    harness = Harness(make_emulator(seed=1), tmp_path / "iotreg.db", TIMING)
    first = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("hall", 3), origin="cli")
    harness.run_until(first.id, State.AWAITING_APPROVAL)
    held = harness.store.chunks(first.id)[0].apply_id

    restart_platform(harness, make_emulator, seed=1)
    second = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("yard", 3), origin="cli")
    third = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("dock", 3), origin="cli")
    caplog.set_level(logging.ERROR)
    assert harness.run_until(second.id, State.FAILED, State.AWAITING_APPROVAL) == State.FAILED
    reason = harness.store.get(second.id).reason
    assert reason.startswith(f"IoT Platform gave ApplyId {held}, which request #{first.id} already holds")
    assert "reset" in reason
    assert harness.store.chunks(first.id)[0].apply_id == held  # the holder keeps its own
    # The next request gets the next ApplyId and goes all the way.
    assert harness.run_until(third.id, State.AWAITING_APPROVAL) == State.AWAITING_APPROVAL
    harness.workflow.requests.approve(third.id, BOB)
    assert harness.run_until(third.id, State.DONE, State.FAILED) == State.DONE
    assert not [r for r in caplog.records if r.exc_info]  # no traceback, no loop


def test_a_stored_apply_id_the_platform_no_longer_knows_fails_that_request_at_once(make_emulator, tmp_path):
    harness = Harness(make_emulator(), tmp_path / "iotreg.db", TIMING)
    waiting = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("gate", 3), origin="cli")
    harness.run_until(waiting.id, State.AWAITING_APPROVAL)
    checking = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("door", 3), origin="cli")
    harness.jobs.run_due()
    assert harness.state(checking.id) == State.CHECKING and harness.store.chunks(checking.id)[0].apply_id

    restart_platform(harness, make_emulator, seed=None)  # unseeded: new ApplyIds, the old ones unknown
    assert harness.run_until(checking.id, State.FAILED, State.AWAITING_APPROVAL) == State.FAILED
    harness.workflow.requests.approve(waiting.id, BOB)
    calls_before = dict(harness.emulator.gateway.calls)
    assert harness.run_until(waiting.id, State.FAILED, State.DONE) == State.FAILED
    for request in (checking, waiting):
        reason = harness.store.get(request.id).reason
        assert "IoT Platform no longer knows ApplyId" in reason and "submit the names again" in reason
    # At once: one refused register call and the look-up of what it may have created, not three rounds.
    assert harness.emulator.gateway.calls["BatchRegisterDeviceWithApplyId"] - calls_before.get("BatchRegisterDeviceWithApplyId", 0) == 1
    assert harness.platform_devices() == set()
    assert {d.reason for d in harness.store.devices(waiting.id)} == {"not created: IoT Platform no longer knows the ApplyId"}

    fresh = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("gate", 3), origin="cli")
    harness.run_until(fresh.id, State.AWAITING_APPROVAL)
    harness.workflow.requests.approve(fresh.id, BOB)
    assert harness.run_until(fresh.id, State.DONE, State.FAILED) == State.DONE


def test_an_auto_named_batch_created_under_a_held_apply_id_fails_saying_where_the_devices_are(make_emulator, tmp_path):
    harness = Harness(make_emulator(seed=1), tmp_path / "iotreg.db", TIMING)
    first = harness.workflow.requests.submit(harness.emulator.product_key, ALICE, names("hall", 3), origin="cli")
    harness.run_until(first.id, State.AWAITING_APPROVAL)
    held = harness.store.chunks(first.id)[0].apply_id

    restart_platform(harness, make_emulator, seed=1)
    counted = harness.workflow.requests.submit_count(harness.emulator.product_key, ALICE, 4, origin="cli")
    harness.workflow.requests.approve(counted.id, BOB)
    assert harness.run_until(counted.id, State.FAILED, State.DONE) == State.FAILED
    reason = harness.store.get(counted.id).reason
    assert f"ApplyId {held}, which request #{first.id} already holds" in reason
    assert f"`iotreg status {held} -p {harness.emulator.product_key}`" in reason
    harness.clock.advance(3)
    assert harness.emulator.backend.application(held).generated and len(harness.platform_devices()) == 4
    assert harness.store.chunks(first.id)[0].apply_id == held


def test_the_cli_after_the_platform_was_reset_fails_that_request_says_why_and_leaves_nothing_stuck(make_emulator, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bot.cli import cli
    from bot.clock import SystemClock

    monkeypatch.chdir(tmp_path)
    before = make_emulator(clock=SystemClock(), check_seconds=0, create_seconds=0)
    env = {**before.env(), "IOTREG_DB": str(tmp_path / "iotreg.db"), "IOTREG_POLL_INTERVAL": "0.05", "IOTREG_POLL_MAX_INTERVAL": "0.2"}
    (tmp_path / "first.txt").write_text("first-0001\nfirst-0002\n", encoding="utf-8")
    runner = CliRunner()
    done = runner.invoke(cli, ["register", "first.txt", "-p", before.product_key, "--yes"], env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output

    # The same seed: the platform after the reset hands out the first request's ApplyId again.
    after = make_emulator(clock=SystemClock(), check_seconds=0, create_seconds=0)
    (tmp_path / "second.txt").write_text("second-0001\n", encoding="utf-8")
    env["IOT_ENDPOINT"] = after.endpoint
    result = runner.invoke(cli, ["register", "second.txt", "-p", after.product_key, "--yes"], env=env, catch_exceptions=False)
    assert result.exit_code == 1
    assert "IoT Platform gave ApplyId 1295006, which request #1 already holds" in result.output
    assert "Traceback" not in result.output
    assert "No unfinished request" in runner.invoke(cli, ["resume"], env=env, catch_exceptions=False).output
