"""The workflow on the real APScheduler, and the CLI killed with SIGKILL mid-registration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from bot.domain import State
from bot.aliyun.client import Credentials, IotClient
from bot.clock import SystemClock
from bot.jobs import SchedulerJobs
from bot.domain import Timing
from bot.registration import Workflow
from bot.store.sqlite import SqliteStore


def wait_until(condition, timeout: float = 20.0, interval: float = 0.02) -> bool:
    """Wait on a condition (not a guess): True as soon as it holds, False at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


class Collecting:
    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.lock = threading.Lock()

    def deliver(self, event) -> None:
        with self.lock:
            self.kinds.append(event.kind)


def test_the_scheduler_drives_a_request_and_resumes_it_after_a_restart(make_emulator, tmp_path):
    emulator = make_emulator(clock=SystemClock(), check_seconds=0.2, create_seconds=0.2)
    clock = SystemClock()
    timing = Timing(poll_interval=0.05, poll_max_interval=0.2)

    def start() -> tuple[Workflow, SchedulerJobs, Collecting]:
        notifier = Collecting()
        client = IotClient(emulator.endpoint, Credentials(emulator.access_key_id, emulator.access_key_secret), clock=clock)
        workflow = Workflow(SqliteStore(tmp_path / "db"), client, clock, timing, notifier=lambda _: notifier, jobs=SchedulerJobs)
        jobs = workflow.jobs
        jobs.start()
        workflow.resume()
        return workflow, jobs, notifier

    workflow, jobs, notifier = start()
    request = workflow.requests.submit(emulator.product_key, "U1", ["sched-0001", "sched-0002"], origin="slack")
    assert wait_until(lambda: workflow.requests.get(request.id).state == State.AWAITING_APPROVAL)
    assert wait_until(lambda: "awaiting_approval" in notifier.kinds)  # said before the restart
    jobs.shutdown()
    workflow.store.close()

    workflow, jobs, notifier = start()  # a new process: the approval arrives after the restart
    try:
        workflow.requests.approve(request.id, "U2")
        assert wait_until(lambda: workflow.requests.get(request.id).state == State.DONE)
        assert wait_until(lambda: "finished" in notifier.kinds)
        assert notifier.kinds == ["approved", "registering", "finished"]
        assert emulator.backend.application(workflow.store.chunks(request.id)[0].apply_id).register_calls == 1
    finally:
        jobs.shutdown()


def test_a_killed_cli_run_finishes_on_resume_without_a_second_registration(make_emulator, tmp_path):
    emulator = make_emulator(clock=SystemClock(), check_seconds=0.1, create_seconds=1.0)
    devices = tmp_path / "devices.txt"
    devices.write_text("".join(f"kill-{i:05d}\n" for i in range(150)))
    env = {**os.environ, **emulator.env(), "IOTREG_DB": str(tmp_path / "iotreg.db"), "IOTREG_POLL_INTERVAL": "0.1", "IOTREG_CHUNK_SIZE": "100"}
    command = [sys.executable, "-m", "bot", "register", str(devices), "-p", emulator.product_key, "--yes"]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        store = SqliteStore(tmp_path / "iotreg.db") if wait_until(lambda: (tmp_path / "iotreg.db").exists()) else None
        assert store is not None
        assert wait_until(lambda: (r := store.get(1)) is not None and r.state == State.REGISTERING)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    assert store.get(1).state == State.REGISTERING
    resumed = subprocess.run([sys.executable, "-m", "bot", "resume", "--yes"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert store.get(1).state == State.DONE
    assert [emulator.backend.application(c.apply_id).register_calls for c in store.chunks(1)] == [1, 1]
    assert len(emulator.backend.devices(emulator.product_key)) == 150
