"""A throwaway PostgreSQL cluster for the tests, the benchmarks and the drills.

:class:`TempCluster` runs ``initdb`` and ``pg_ctl`` from the installed server (``/usr/lib/postgresql/*/bin``,
``pg_config --bindir``, or ``PATH``) in a temporary folder: it listens on 127.0.0.1 on a free port
and on a socket in that folder, trusts one user, and is stopped and deleted by :meth:`TempCluster.stop`.
``initdb`` refuses to run as root, so as root (a CI machine, a container) the server runs as the
``postgres`` system user (``runuser``), which then owns the folder.

Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``): it is a cluster for
throwaway data, and the drills kill iotreg, not the database.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

USER = "iotreg"
INSTALL_HINT = "no PostgreSQL server found (initdb, pg_ctl): install it, e.g. `apt-get install postgresql`"


class ClusterUnavailable(RuntimeError):
    """No PostgreSQL server is installed here, or it would not start. The message says which."""


def find_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``, or ``None`` when no server is installed."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            pass
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempCluster:
    """A PostgreSQL server of its own in a temporary folder. ``start()``, ``url(db)``, ``stop()``."""

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise ClusterUnavailable(INSTALL_HINT)
        self.bindir = found
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="iotreg-pg-"))
        self.data = self.folder / "data"
        self.sockets = self.folder / "sockets"
        self.log = self.folder / "server.log"
        # initdb refuses root: as root, run the server as the postgres system user.
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterUnavailable("running as root and there is no `postgres` user to run the server as") from None
            self._as = ["runuser", "-u", "postgres", "--"]
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        self.sockets.mkdir()
        if self._as:
            os.chown(self.sockets, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
        self.running = False

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as, str(self.bindir / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder)
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip().splitlines()
            raise ClusterUnavailable(f"{program} failed: {output[-1] if output else done.returncode}")

    def start(self) -> TempCluster:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        try:
            self._run("pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data), "-l", str(self.log), "-o", options)
        except ClusterUnavailable as exc:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.exists() else []
            raise ClusterUnavailable(f"{exc} ({tail[0] if tail else 'no server log'})") from None
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode`` as ``pg_ctl -m``); the folder stays (see :meth:`destroy`)."""
        if self.running:
            self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data))
            self.running = False

    def destroy(self) -> None:
        """Stop the server at once and delete its folder."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection:
        """A connection to the maintenance database, in autocommit (for CREATE DATABASE)."""
        return psycopg.connect(self.url(), autocommit=True)

    def create_database(self, name: str, template: str = "template1") -> str:
        """A new database (copied from ``template``); returns its URL."""
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def __enter__(self) -> TempCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
