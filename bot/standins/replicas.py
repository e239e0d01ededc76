"""Several ``iotreg serve`` processes on one PostgreSQL database, as a deployment with replicas runs
them: for the tests, the drills and the benchmarks.

:class:`Replicas` starts N ``python -m bot serve --host 127.0.0.1 --port P`` processes from one
environment (``IOTREG_DB`` a PostgreSQL URL, the emulator's and the local Slack's variables). Each
replica has its own port, its own process group (so :meth:`Replicas.kill` takes it whole, as a
machine or a container dies), its own working directory and home (``HOME``, ``IOTREG_HOME``,
``TMPDIR``, the XDG folders all point into ``folder/replica-I/``, so two replicas share no file
but the database) and its log (``folder/replica-I.log``, stdout and stderr, appended across
starts). :meth:`Replicas.written` lists what a replica left in its folder: ``iotreg serve`` on
PostgreSQL writes nothing there (no lock file, no control socket), which the tests check.

People reach the replicas through :meth:`Replicas.workspace` (a signed-request
:class:`~bot.standins.slack.Workspace` aimed at one replica) or :class:`Spread`, which hands each
command or click to the next live replica in turn, as a round-robin load balancer does, and tries
the next one when a replica does not answer.

    with Replicas(3, env, folder) as replicas:
        replicas.kill(1)              # SIGKILL to its process group
        replicas.start(1)             # and back, once /healthz answers 200
        code = replicas.terminate(2)  # SIGTERM; its exit status
        print(replicas.logs())        # the tail of every log, for a failure message
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import requests

from bot.standins.postgres import free_port
from bot.standins.slack import FakeSlack, Workspace

#: Seconds a replica may take to answer ``/healthz`` 200 after it starts (imports, migrations).
START_TIMEOUT = 60.0


class ReplicaError(RuntimeError):
    """A replica did not start, or did not stop when asked; the message ends with its log's tail."""


class Replica:
    """One ``iotreg serve`` process that can be started, killed and started again on its port."""

    def __init__(self, index: int, env: Mapping[str, str], folder: Path, *, host: str = "127.0.0.1") -> None:
        self.index = index
        self.host = host
        self.port = free_port()
        self.home = folder / f"replica-{index}"
        self.home.mkdir(parents=True, exist_ok=True)
        self.log = folder / f"replica-{index}.log"
        own = {
            "HOME": str(self.home), "IOTREG_HOME": str(self.home), "TMPDIR": str(self.home),
            "XDG_DATA_HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home), "XDG_CACHE_HOME": str(self.home),
        }
        self.env = {**env, **own, "PYTHONUNBUFFERED": "1"}
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def events_url(self) -> str:
        return f"{self.url}/slack/events"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.alive else None  # type: ignore[union-attr]

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, *, wait: bool = True) -> Replica:
        """Start the process (if it is not running) and, with ``wait``, wait for ``/healthz`` 200."""
        with self._lock:
            if not self.alive:
                with self.log.open("ab") as out:
                    out.write(f"--- start {self.starts + 1} of replica {self.index} on port {self.port}\n".encode())
                    out.flush()
                    self.process = subprocess.Popen(
                        [sys.executable, "-m", "bot", "serve", "--host", self.host, "--port", str(self.port)],
                        env=self.env, cwd=self.home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    )
                self.starts += 1
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise ReplicaError(f"replica {self.index} exited with status {self.process.returncode if self.process else None}\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise ReplicaError(f"replica {self.index} did not answer /healthz 200 within {timeout:.0f}s\n{self.tail()}")

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def kill(self) -> None:
        """SIGKILL to the whole process group: nothing runs a handler, nothing is handed back."""
        with self._lock:
            if self.alive:
                assert self.process is not None
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, as a platform stops a process; returns the exit status (``None`` if it was not
        running). Raises :class:`ReplicaError` (after a SIGKILL) if it has not exited in ``timeout``."""
        with self._lock:
            if not self.alive:
                return None
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
                raise ReplicaError(f"replica {self.index} was still running {timeout:.0f}s after SIGTERM\n{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"== replica {self.index} (port {self.port}), {self.log}:\n" + "\n".join(text.splitlines()[-lines:])

    def written(self) -> list[str]:
        """What the replica left in its own folder (its working directory and home)."""
        return sorted(str(p.relative_to(self.home)) for p in self.home.rglob("*"))


class Replicas:
    """N replicas of ``iotreg serve`` sharing ``env`` (its ``IOTREG_DB``); see the module docstring."""

    def __init__(self, count: int, env: Mapping[str, str], folder: Path, *, host: str = "127.0.0.1") -> None:
        if count < 1:
            raise ValueError("at least one replica")
        self.folder = folder
        self.replicas = [Replica(i, env, folder, host=host) for i in range(count)]

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    def start(self, index: int | None = None) -> Replicas:
        """Start one replica, or all of them at once (then wait for every ``/healthz``)."""
        chosen = self.replicas if index is None else [self.replicas[index]]
        for replica in chosen:
            replica.start(wait=False)
        for replica in chosen:
            replica.wait_healthy()
        return self

    def kill(self, index: int) -> None:
        self.replicas[index].kill()

    def terminate(self, index: int, timeout: float = 30.0) -> int | None:
        return self.replicas[index].terminate(timeout)

    def live(self) -> list[int]:
        return [r.index for r in self.replicas if r.alive]

    def by_pid(self, pid: int) -> Replica | None:
        return next((r for r in self.replicas if r.alive and r.pid == pid), None)

    def by_address(self, address: tuple[str, int]) -> Replica | None:
        """The live replica whose TCP connection has the local ``(host, port)`` ``address``: the one
        that made a call a server saw from there (:attr:`bot.standins.slack.state.Hold.calls`,
        :attr:`bot.standins.emulator.server.AnswerHold.callers`).

        ``/proc/net/tcp`` is read in pieces, and a line can be missed while other sockets open and
        close meanwhile: a socket not found is looked for again for up to a second."""
        deadline = time.monotonic() + 1.0
        while (inode := _socket_inode(address)) is None:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        for replica in self.replicas:
            pid = replica.pid
            if pid is not None and inode in _socket_inodes(pid):
                return replica
        return None

    def stop(self) -> list[int | None]:
        """SIGTERM every replica (SIGKILL after 30 s); their exit statuses."""
        statuses: list[int | None] = []
        for replica in self.replicas:
            try:
                statuses.append(replica.terminate())
            except ReplicaError:
                statuses.append(-signal.SIGKILL)
        return statuses

    def logs(self, lines: int = 40) -> str:
        return "\n".join(r.tail(lines) for r in self.replicas)

    def workspace(self, fake: FakeSlack, signing_secret: str, index: int, **options: Any) -> Workspace:
        """People whose requests go to replica ``index``."""
        return Workspace(fake, signing_secret, app_url=self.replicas[index].events_url, **options)

    def __enter__(self) -> Replicas:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _socket_inode(address: tuple[str, int]) -> str | None:
    """The inode of the IPv4 TCP socket bound locally to ``address`` (Linux ``/proc/net/tcp``)."""
    host, port = address
    wanted = f"{''.join(f'{int(part):02X}' for part in reversed(host.split('.')))}:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if fields[1] == wanted:
            return fields[9]
    return None


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` has open."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except OSError:
        pass
    return inodes


class Spread:
    """People reaching the replicas through a round-robin load balancer: each call goes to the next
    live replica; a replica that does not answer (killed, stopping) is skipped and the next tried,
    until ``patience`` seconds have passed. ``counts[i]`` tells how many calls replica ``i`` answered,
    ``refused`` how many tries found a replica not answering.
    Thread-safe (one :class:`Workspace` per replica and thread)."""

    def __init__(self, replicas: Replicas, fake: FakeSlack, signing_secret: str, *, patience: float = 30.0, timeout: float = 10.0) -> None:
        self.replicas = replicas
        self.fake = fake
        self.secret = signing_secret
        self.patience = patience
        self.timeout = timeout
        self.counts = [0] * len(replicas)
        self.refused = 0
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _workspace(self, index: int) -> Workspace:
        cache = self._local.__dict__.setdefault("workspaces", {})
        if index not in cache:
            cache[index] = self.replicas.workspace(self.fake, self.secret, index, timeout=self.timeout)
        return cache[index]

    def to(self, index: int) -> Workspace:
        """People whose requests go to replica ``index`` alone (this thread's connection to it)."""
        return self._workspace(index)

    def call(self, act: Callable[[Workspace], requests.Response]) -> requests.Response:
        """``act(workspace)`` on the next live replica, skipping those that do not answer."""
        deadline = time.monotonic() + self.patience
        failures: list[str] = []
        while True:
            with self._lock:
                turn = next(self._turn)
            index = turn % len(self.replicas)
            if self.replicas[index].alive:
                try:
                    answer = act(self._workspace(index))
                    if answer.status_code < 500:
                        with self._lock:
                            self.counts[index] += 1
                        return answer
                    failures.append(f"replica {index}: HTTP {answer.status_code}")
                except requests.RequestException as exc:
                    failures.append(f"replica {index}: {type(exc).__name__}")
                with self._lock:
                    self.refused += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica answered within {self.patience:.0f}s: {failures[-5:]}")
            if turn % len(self.replicas) == len(self.replicas) - 1:
                time.sleep(0.05)  # a whole round refused: wait a little before the next

    def command(self, user: str, channel: str, text: str = "", **kw: Any) -> requests.Response:
        return self.call(lambda ws: ws.command(user, channel, text, **kw))

    def click(self, user: str, surface: Mapping[str, Any], action_id: str, value: str | None = None, **kw: Any) -> requests.Response:
        return self.call(lambda ws: ws.click(user, surface, action_id, value, **kw))
