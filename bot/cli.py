"""The ``iotreg`` command line: one click group, a sub-command per front end or tool.

Errors reach the user here and only here (:class:`Iotreg.invoke`): a configuration, database,
platform or workflow error becomes a one-line message, and every command ends with one of the
:class:`Exit` statuses (README, "Exit status"). The commands call the request service, never the
store; those that need no API call run without IoT credentials and never create a database.
"""

from __future__ import annotations

import enum
import getpass
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click

from bot import __version__, logs, wiring
from bot.aliyun.client import ApplyStatus
from bot.aliyun.errors import IotError
from bot.clock import SystemClock
from bot.config import ConfigError, Settings, parse_quotas
from bot.domain import (
    ACTIVE_STATES, FINAL_STATES, AuditEntry, Chunk, Conflict, Event, Origin, Outcome, Request, State, Summary, WorkflowError,
)
from bot.policy import Policy, PolicyError
from bot.registration import Workflow
from bot.service import RequestService
from bot.store import StoreUnavailable, is_url


class Exit(enum.IntEnum):
    """How an ``iotreg`` command ended (its exit status); when several apply, the worst (last) wins."""

    OK = 0  # every line of the list became a device (or the command did what it was asked)
    ERROR = 1  # it could not run: configuration, file, database; IoT Platform unreachable, refusing the key, no such product
    USAGE = 2  # wrong arguments (click's own)
    REJECTED_LOCALLY = 3  # some lines were not valid device names and were skipped; the rest were registered
    REFUSED = 4  # IoT Platform's check refused names: nothing registered, or only the others (--skip-invalid)
    FAILED = 5  # some devices were not created, or the registration failed
    NOT_APPROVED = 6  # declined, cancelled or expired: nothing registered
    WAITING = 7  # a request still waits: no answer at the prompt, or another terminal is driving it
    INTERRUPTED = 130  # Ctrl-C (the request is saved: `iotreg resume`)


SEVERITY = [Exit.OK, Exit.REJECTED_LOCALLY, Exit.REFUSED, Exit.NOT_APPROVED, Exit.WAITING, Exit.FAILED, Exit.ERROR, Exit.INTERRUPTED]


def worst(*statuses: Exit) -> Exit:
    return max(statuses, key=SEVERITY.index, default=Exit.OK)


class Stop(click.ClickException):
    """End the command with a one-line message and an :class:`Exit` status."""

    def __init__(self, message: str, status: Exit = Exit.ERROR) -> None:
        super().__init__(message)
        self.exit_code = int(status)


class Iotreg(click.Group):
    """The edge where errors are caught: each becomes one line and an exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, StoreUnavailable, WorkflowError, IotError, OSError) as exc:
            raise Stop(str(exc)) from None
        except KeyboardInterrupt:
            raise Stop("interrupted", Exit.INTERRUPTED) from None


@click.group(cls=Iotreg, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iotreg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Register IoT devices in batches on Alibaba Cloud IoT Platform."""
    ctx.obj = {"verbose": verbose}
    logs.configure(verbose)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="iotreg")


JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON on standard output (messages go to standard error).")
OUTPUT_OPTION = click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Write each device's outcome to this CSV file."
)
YES_OPTION = click.option("-y", "--yes", is_flag=True, help="Approve without asking (at the terminal, you are the approver).")


def operator() -> str:
    """Who is at the terminal, as the audit trail names them."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def load_settings() -> Settings:
    return Settings.load()


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


# -- the terminal: event lines, progress bars, and where the summary goes ------------------------


class Terminal:
    """Where the CLI speaks: event lines on standard error, never glued to a progress bar; the summary
    on standard output, or on standard error when standard output carries JSON."""

    def __init__(self, *, as_json: bool = False, err: IO[str] | None = None) -> None:
        self.as_json = as_json
        self.err = err
        self.bar: Any = None

    def line(self, text: str) -> None:
        """An event line; a progress bar on the terminal is cleared first and drawn again after."""
        stream = self.err or sys.stderr
        drawn = self.bar is not None and stream.isatty()
        if drawn:
            stream.write("\r\x1b[K")
        click.echo(text, file=stream)
        if drawn:
            self.bar._last_line = None  # click draws a line only when it changed; this one was wiped
            self.bar.render_progress()

    def say(self, text: str = "") -> None:
        click.echo(text, err=self.as_json)

    @contextmanager
    def progress(self, label: str, length: int) -> Iterator[Any]:
        stream = self.err or sys.stderr
        with click.progressbar(length=length, label=label, file=stream, show_pos=False, show_percent=True) as bar:
            self.bar = bar
            try:
                yield bar
            finally:
                self.bar = None


class TerminalNotifier:
    """The CLI's side of the workflow's notifications: one line per step."""

    def __init__(self, requests: RequestService, terminal: Terminal) -> None:
        self.requests = requests
        self.terminal = terminal

    def deliver(self, event: Event) -> None:
        request = self.requests.get(event.request_id)
        line = describe_event(event, request) if request is not None else None
        if line:
            self.terminal.line(line)


def describe_event(event: Event, request: Request) -> str | None:
    """A one-line account of a workflow event, for the terminal."""
    n = f"#{request.id}"
    payload = event.payload
    match event.kind:
        case "created":
            return f"Request {n}: checking {request.count:,} name(s) with IoT Platform (product {request.product_key})."
        case "awaiting_approval":
            what = f"{request.count:,} device(s) named by the platform" if request.kind == "count" else f"all {request.count:,} name(s) passed the check"
            return f"Request {n}: {what}; waiting for approval."
        case "check_failed":
            return f"Request {n}: {payload.get('invalid', 0):,} name(s) failed the platform's check; {payload.get('valid', 0):,} passed."
        case "approved":
            return f"Request {n}: approved by {payload.get('by')}."
        case "rejected":
            reason = f": {payload['reason']}" if payload.get("reason") else ""
            return f"Request {n}: rejected by {payload.get('by')}{reason}."
        case "cancelled":
            return f"Request {n}: cancelled by {payload.get('by')}."
        case "expired":
            return f"Request {n}: expired without approval."
        case "registering":
            return f"Request {n}: registering."
        case "finished":
            if request.state == State.FAILED:
                return f"Request {n}: failed: {request.reason}."
            return f"Request {n}: registration finished."
        case _:
            return None


@contextmanager
def open_workflow(settings: Settings, terminal: Terminal, *, api: bool = True) -> Iterator[Workflow]:
    """The workflow for CLI requests, run in this process on the real clock.

    ``api=False``: for commands that make no API call (no IoT credentials needed).
    """
    from bot.jobs import InlineJobs

    clock = SystemClock()
    if api:
        settings.require("access_key_id", "access_key_secret")  # before a database is created
    wiring.prepare_home(settings)
    workflow = wiring.workflow(
        settings,
        clock=clock,
        notifier=lambda requests: TerminalNotifier(requests, terminal),
        jobs=lambda steps: InlineJobs(clock, steps),
        policy=Policy(allow_self_approval=True),  # at the terminal, the operator approves
        origins=frozenset({Origin.CLI}),
        api=api,
    )
    try:
        yield workflow
    finally:
        workflow.close()


@contextmanager
def reading(settings: Settings) -> Iterator[RequestService | None]:
    """The request service for a query, or ``None`` when there is no database yet (none is created)."""
    if not wiring.database_exists(settings):
        yield None
        return
    with open_workflow(settings, Terminal(), api=False) as workflow:
        yield workflow.requests


# -- driving a request at the terminal ---------------------------------------------------------

CHECK_DONE = {ApplyStatus.CHECK_SUCCESS.value, ApplyStatus.CHECK_FAILED.value}
CREATE_DONE = {ApplyStatus.CREATE_SUCCESS.value, ApplyStatus.CREATE_FAILED.value, "UNKNOWN"}


def progress_units(chunks: list[Chunk], registering: bool) -> int:
    """How far a phase is, in half-devices: a part counts half when the platform took it (an ApplyId,
    a register call confirmed) and whole when it ended, so the bar moves with each part's steps."""
    units = 0
    for chunk in chunks:
        if registering:
            units += chunk.size * ((chunk.register_confirmed_at is not None) + (chunk.status in CREATE_DONE))
        else:
            units += chunk.size * ((chunk.apply_id is not None or chunk.status is not None) + (chunk.status in CHECK_DONE))
    return units


class Driver:
    """Takes CLI requests from wherever they are to their end, at this terminal."""

    def __init__(self, workflow: Workflow, terminal: Terminal, *, yes: bool, output: Path | None = None) -> None:
        self.workflow = workflow
        self.requests = workflow.requests
        self.jobs: Any = workflow.jobs
        self.terminal = terminal
        self.yes = yes
        self.output = output
        self.token = workflow.reconciler.owner
        self.finished: list[Summary] = []

    def drive(self, request: Request, *, skip_invalid: bool = False) -> Exit:
        """Drive one request (and the retry --skip-invalid makes of it); returns its exit status."""
        other = self.requests.drive(request.id, self.token)
        if other is not None:
            self.terminal.line(
                f"Request #{request.id} is being driven by another iotreg ({describe_process(other)}): left to it. "
                f"Run `iotreg status {request.id}` to follow it."
            )
            return Exit.WAITING
        try:
            return self._drive(request, skip_invalid)
        except KeyboardInterrupt:
            now = self.requests.get(request.id) or request
            if now.state == State.AWAITING_APPROVAL:
                hint = f"request #{now.id} waits for approval: `iotreg resume {now.id}` to answer, `iotreg cancel {now.id}` to withdraw it"
            else:
                hint = f"request #{now.id} is saved: run `iotreg resume {now.id}` to finish it"
            raise Stop(f"interrupted; {hint}", Exit.INTERRUPTED) from None
        finally:
            self.requests.let_go(request.id, self.token)

    def _drive(self, request: Request, skip_invalid: bool) -> Exit:
        if request.state == State.CHECKING:
            request = self.wait(request.id, "Checking names", registering=False, until=set(FINAL_STATES) | {State.AWAITING_APPROVAL})
        if request.state == State.CHECK_FAILED:
            self.show_invalid(request.id)
            summary = self.requests.summary(request.id)
            valid = request.count - summary.invalid
            if valid and (skip_invalid or self.confirm(f"Register the {valid:,} valid name(s) in a new request?", request) is True):
                self.finished.append(summary)  # for --json; the summary printed is the new request's
                retry = self.requests.retry_valid(request.id, operator())
                return worst(exit_status(summary), self.drive(retry))
            self.terminal.line("Nothing was registered. Fix the names above and run again, or add --skip-invalid.")
            return self.finish(request)
        if request.state == State.AWAITING_APPROVAL:
            question = f"Register {request.count:,} device(s) in product {request.product_key}?"
            answer = True if self.yes else self.confirm(question, request)
            if answer is None:
                return Exit.WAITING
            try:
                if answer:
                    self.requests.approve(request.id, operator())
                else:
                    self.requests.reject(request.id, operator(), "declined at the terminal")
            except Conflict as exc:  # decided meanwhile (by another terminal, or it expired)
                self.terminal.line(f"{exc}.")
            self.jobs.run_due()
            request = self.requests.require(request.id)
        if request.state in (State.APPROVED, State.REGISTERING):
            request = self.wait(request.id, "Registering", registering=True, until=set(FINAL_STATES))
        return self.finish(request)

    def confirm(self, question: str, request: Request) -> bool | None:
        """Ask at the terminal; ``None`` when there is no one to answer (standard input closed)."""
        try:
            return click.confirm(question, err=self.terminal.as_json)
        except click.Abort as exc:
            if isinstance(exc.__context__, EOFError):
                self.terminal.line(
                    f"No answer at the prompt (no terminal?): request #{request.id} waits for approval. "
                    f"`iotreg resume {request.id} --yes` approves it, `iotreg cancel {request.id}` withdraws it."
                )
                return None
            raise KeyboardInterrupt from None

    def wait(self, request_id: int, label: str, *, registering: bool, until: set[State]) -> Request:
        """Run the workflow until the request reaches one of ``until``, with a progress bar."""
        total = 2 * sum(c.size for c in self.requests.chunks(request_id))
        with self.terminal.progress(label, total) as bar:
            shown = 0

            def reached() -> bool:
                nonlocal shown
                units = progress_units(self.requests.chunks(request_id), registering)
                if units > shown:
                    bar.update(units - shown)
                    shown = units
                return self.requests.require(request_id).state in until

            self.jobs.run_until(reached)
        self.jobs.run_due()  # deliver the notifications of the last step (and read the IotIds, after the result)
        return self.requests.require(request_id)

    def wait_for_iot_ids(self, request: Request) -> None:
        """The outcome file is written once the created devices' IotIds are read (they come after the
        result): the terminal waits for them, and says so when they do not come at once."""
        def read() -> bool:
            return not self.requests.summary(request.id).iot_ids_pending

        if read():
            return
        self.terminal.line(
            f"Request #{request.id}: reading the IotIds of the created devices from IoT Platform failed; trying again "
            f"(Ctrl-C stops waiting: `iotreg resume {request.id}` waits again)."
        )
        self.jobs.run_until(read)

    def show_invalid(self, request_id: int, limit: int = 20) -> None:
        invalid = self.requests.devices(request_id, outcome=Outcome.INVALID)
        self.terminal.line("Names the platform refused:")
        for device in invalid[:limit]:
            self.terminal.line(f"  {device.name:<34} {device.reason}")
        if len(invalid) > limit:
            self.terminal.line(f"  … and {len(invalid) - limit:,} more (see --output)")

    def finish(self, request: Request) -> Exit:
        """Print the summary, write the report; returns the request's exit status."""
        from bot import report

        self.wait_for_iot_ids(request)
        summary = self.requests.summary(request.id)
        self.finished.append(summary)
        say = self.terminal.say
        say(f"\nRequest #{request.id} ({request.product_key}): {request.state.label}")
        if request.reason and request.state != State.DONE:
            say(f"  reason: {request.reason}")
        for label, count in summary_rows(summary):
            if count or label == "registered":
                say(f"  {label:<18}{count:>10,}")
        failed = self.requests.devices(request.id, outcome=Outcome.NOT_CREATED, limit=20)
        if failed:
            say("Devices that failed:")
            for device in failed:
                say(f"  {device.name:<34} {device.reason}")
            if summary.failed > len(failed):
                say(f"  … and {summary.failed - len(failed):,} more")
            say(f"`iotreg retry-failed {request.id}` registers them again in one new request.")
        if self.output is not None:
            rows_written = report.write_outcomes(self.output, self.requests, request.id)
            say(f"Wrote {rows_written:,} device outcome(s) to {self.output}")
        return exit_status(summary)


def summary_rows(summary: Summary) -> list[tuple[str, int]]:
    return [
        ("registered", summary.created),
        ("failed", summary.failed),
        ("refused by check", summary.invalid),
        ("not registered", summary.pending if summary.request.final else 0),
        ("rejected locally", summary.rejected_locally),
    ]


def exit_status(summary: Summary) -> Exit:
    """What a request's outcome means for the exit status (see :class:`Exit`)."""
    state = summary.request.state
    if state in (State.REJECTED, State.CANCELLED, State.EXPIRED):
        return Exit.NOT_APPROVED
    if state == State.FAILED and summary.request.decided_by is None:
        return Exit.ERROR  # the check itself failed: unreachable, the key refused, no such product
    if state == State.FAILED or summary.failed or (state == State.DONE and summary.pending):
        return Exit.FAILED
    if not state.final:
        return Exit.WAITING
    if state == State.CHECK_FAILED or summary.invalid:
        return Exit.REFUSED
    if summary.rejected_locally:
        return Exit.REJECTED_LOCALLY
    return Exit.OK


def describe_process(token: str) -> str:
    host, _, rest = token.partition(":")
    return f"process {rest.partition(':')[0]} on {host}"


def request_json(requests: RequestService, request: Request) -> dict[str, Any]:
    """A request as ``--json`` shows it."""
    summary = requests.summary(request.id)
    return {
        "id": request.id,
        "product_key": request.product_key,
        "state": str(request.state),
        "kind": str(request.kind),
        "origin": str(request.origin),
        "requester": request.requester,
        "created_at": request.created_at.isoformat(),
        "updated_at": request.updated_at.isoformat(),
        "decided_by": request.decided_by,
        "reason": request.reason,
        "retry_of": request.retry_of,
        "devices": request.count,
        "registered": summary.created,
        "failed": summary.failed,
        "refused_by_check": summary.invalid,
        "pending": summary.pending,
        "rejected_locally": summary.rejected_locally,
        "iot_ids_pending": summary.iot_ids_pending,
        "apply_ids": requests.apply_ids(request.id),
        "exit_status": int(exit_status(summary)),
    }


def end(driver: Driver, status: Exit, as_json: bool) -> None:
    """Print the JSON of what was driven (``--json``) and exit with ``status``; called with the
    workflow still open, as the JSON is read from its store."""
    if as_json:
        print_json({"exit_status": int(status), "requests": [request_json(driver.requests, s.request) for s in driver.finished]})
    sys.exit(int(status))


# -- the commands ------------------------------------------------------------------------------


@cli.command()
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-p", "--product-key", required=True, help="The product to register the devices in.")
@click.option("--count", type=click.IntRange(1, 1_000_000), help="Let the platform name COUNT devices instead of reading FILE.")
@YES_OPTION
@click.option("--skip-invalid", is_flag=True, help="If the platform refuses some names, register the others.")
@OUTPUT_OPTION
@JSON_OPTION
def register(
    file: Path | None, product_key: str, count: int | None, yes: bool, skip_invalid: bool, output: Path | None, as_json: bool
) -> None:
    """Register the devices named in FILE (CSV or text, one name a line) in a product.

    Names are checked locally, then by IoT Platform; after your confirmation (or --yes) the
    devices are created. The request is saved as it goes: if this is interrupted, run
    `iotreg resume` to finish it without registering anything twice. Exit status 0 only when
    every line became a device (README, "Exit status").
    """
    from bot.names import DeviceListError, read_device_file

    if (file is None) == (count is None):
        raise click.UsageError("give either FILE or --count")
    settings = load_settings()
    terminal = Terminal(as_json=as_json)
    devices = None
    if file is not None:
        try:
            with file.open("rb") as source:
                devices = read_device_file(source, filename=file.name, product_key=product_key)
        except DeviceListError as exc:
            raise Stop(exc.message) from None
        if devices.read_as:
            terminal.line(f"Read {file.name} as {devices.read_as}: it is not UTF-8. If names look wrong, save it as CSV UTF-8.")
        show_rejected(terminal, devices)
    with open_workflow(settings, terminal) as workflow:
        driver = Driver(workflow, terminal, yes=yes, output=output)
        try:
            if devices is not None:
                request = workflow.requests.submit(
                    product_key, operator(), devices.devices, origin=Origin.CLI,
                    rejected=devices.rejected, rejected_count=devices.rejected_count,
                )
            else:
                request = workflow.requests.submit_count(product_key, operator(), count, origin=Origin.CLI)
        except KeyboardInterrupt:
            raise Stop("interrupted; nothing was sent", Exit.INTERRUPTED) from None
        status = driver.drive(request, skip_invalid=skip_invalid)
        end(driver, status, as_json)


def show_rejected(terminal: Terminal, devices: Any, limit: int = 20) -> None:
    if not devices.rejected_count:
        return
    terminal.line(f"{devices.rejected_count:,} line(s) were not valid and will be skipped:")
    for rejected in devices.rejected[:limit]:
        terminal.line(f"  {rejected}")
    if devices.rejected_count > limit:
        terminal.line(f"  … and {devices.rejected_count - limit:,} more (all listed in --output)")


@cli.command()
@click.argument("request_ids", nargs=-1, type=int)
@click.option("-y", "--yes", is_flag=True, help="Approve waiting requests without asking.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Write the outcomes of the (single) request to this CSV file.")
@JSON_OPTION
def resume(request_ids: tuple[int, ...], yes: bool, output: Path | None, as_json: bool) -> None:
    """Finish CLI requests that were interrupted (all unfinished ones, or those given).

    A request that another iotreg is driving right now (at its prompt, say) is left to it.
    """
    settings = load_settings()
    terminal = Terminal(as_json=as_json)
    if not wiring.database_exists(settings):
        terminal.say("No unfinished request.")
        return
    with open_workflow(settings, terminal) as workflow:
        driver = Driver(workflow, terminal, yes=yes)
        if request_ids:
            found = [workflow.requests.get(i) for i in request_ids]
            missing = [str(i) for i, r in zip(request_ids, found) if r is None or r.origin != Origin.CLI]
            if missing:
                raise Stop(f"no CLI request #{', #'.join(missing)}")
            requests = [r for r in found if r is not None]
        else:
            requests = workflow.requests.requests(states=ACTIVE_STATES, origins=[Origin.CLI], limit=1000)
            busy = [r for r in requests if workflow.requests.driven_by(r)]
            for request in busy:
                terminal.line(f"Request #{request.id} is being driven by another iotreg ({describe_process(workflow.requests.driven_by(request) or '')}): skipped.")
            requests = [r for r in requests if r not in busy]
        if not requests:
            terminal.say("No unfinished request.")
            return
        driver.output = output if len(requests) == 1 else None
        workflow.resume()
        status = Exit.OK
        for request in sorted(requests, key=lambda r: r.id):
            status = worst(status, driver.finish(request) if request.final else driver.drive(request))
        end(driver, status, as_json)


@cli.command("retry-failed")
@click.argument("request_id", type=int)
@YES_OPTION
@OUTPUT_OPTION
@JSON_OPTION
def retry_failed(request_id: int, yes: bool, output: Path | None, as_json: bool) -> None:
    """Register again, in one new request (one check, one approval), the devices of a finished
    request that were not created."""
    settings = load_settings()
    terminal = Terminal(as_json=as_json)
    if not wiring.database_exists(settings):
        raise Stop(f"there is no request #{request_id}")
    with open_workflow(settings, terminal) as workflow:
        driver = Driver(workflow, terminal, yes=yes, output=output)
        new = workflow.requests.retry_failed(request_id, operator())
        terminal.line(f"Request #{new.id} registers the {new.count:,} device(s) of #{request_id} that were not created.")
        status = driver.drive(new)
        end(driver, status, as_json)


@cli.command()
@click.argument("request_id", type=int)
def cancel(request_id: int) -> None:
    """Withdraw a request that is not approved yet (checking, waiting for approval, or a failed check)."""
    settings = load_settings()
    if not wiring.database_exists(settings):
        raise Stop(f"there is no request #{request_id}")
    terminal = Terminal()
    with open_workflow(settings, terminal, api=False) as workflow:
        request = workflow.requests.cancel(request_id, operator())
        workflow.jobs.run_due()  # type: ignore[attr-defined]  # InlineJobs: tell this terminal now
    terminal.say(f"Request #{request.id} ({request.product_key}): {request.state.label}. Nothing was registered.")


@cli.command()
@click.argument("ref")
@click.option("-p", "--product-key", help="The product of an ApplyId that is not in the local database.")
@JSON_OPTION
def status(ref: str, product_key: str | None, as_json: bool) -> None:
    """Where a request (its number, `12` or `#12`) or an ApplyId stands: its state, what became of
    its devices, its ApplyIds. An ApplyId is also looked up on IoT Platform."""
    settings = load_settings()
    number = int(ref.lstrip("#")) if ref.lstrip("#").isdigit() else None
    local, chunks, apply_id = None, [], None
    with reading(settings) as requests:
        request = requests.find(ref) if requests is not None else None
        if requests is not None and request is not None:
            local, chunks = request_json(requests, request), requests.chunks(request.id)
            product_key = product_key or request.product_key
            apply_id = number if number in local["apply_ids"] else None
        elif product_key is not None and number is not None:
            apply_id = number
        else:
            raise Stop(f"no request or ApplyId {ref} in {settings.db_location}; to ask IoT Platform about an ApplyId, add -p PRODUCT_KEY")
    platform = None
    if apply_id is not None and product_key is not None:
        with wiring.iot_client(settings) as client:
            platform = client.query_batch_register_device_status(product_key, apply_id)
    if as_json:
        print_json({
            "request": local,
            "platform": None if platform is None else {
                "apply_id": apply_id, "status": platform.status.value, "valid": len(platform.valid), "invalid": len(platform.invalid),
                "details": [{"name": d.name, "reason": d.reason} for d in platform.details],
            },
        })
        return
    if local is not None:
        decided = f", decided by {local['decided_by']}" if local["decided_by"] else ""
        click.echo(f"Request #{local['id']} ({local['product_key']}): {State(local['state']).label}")
        click.echo(f"  requested by {local['requester']} at {local['created_at'][:16].replace('T', ' ')} UTC{decided}")
        if local["reason"] and local["state"] != State.DONE:
            click.echo(f"  reason: {local['reason']}")
        for label, key in (
            ("registered", "registered"), ("failed", "failed"), ("refused by check", "refused_by_check"),
            ("pending", "pending"), ("rejected locally", "rejected_locally"),
        ):
            if local[key] or key == "registered":
                click.echo(f"  {label:<18}{local[key]:>10,}")
        if local["iot_ids_pending"]:
            click.echo("  IotIds of the registered devices: still being read from IoT Platform")
        for chunk in chunks:
            if chunk.apply_id:
                click.echo(f"  ApplyId {chunk.apply_id}: {chunk.size:,} device(s), {chunk.status or 'not sent'}")
    if platform is not None:
        click.echo(f"ApplyId {apply_id} on IoT Platform: {platform.status.value}")
        if platform.valid or platform.invalid:
            click.echo(f"  valid {len(platform.valid):,}, invalid {len(platform.invalid):,}")
        for detail in platform.details[:20]:
            click.echo(f"  {detail.name:<34} {detail.reason}")
        if len(platform.details) > 20:
            click.echo(f"  … and {len(platform.details) - 20:,} more")


@cli.command()
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 10_000), help="How many requests to show.")
@click.option("--state", "states", multiple=True, type=click.Choice(sorted(FINAL_STATES | ACTIVE_STATES)), help="Only requests in this state (repeatable).")
@JSON_OPTION
def requests(limit: int, states: tuple[str, ...], as_json: bool) -> None:
    """Recent requests, newest first, with their states and outcomes."""
    with reading(load_settings()) as service:
        if service is None:
            click.echo("[]" if as_json else "No requests yet.")
            return
        rows = service.requests(states=[State(s) for s in states] or None, limit=limit)
        if as_json:
            print_json([request_json(service, r) for r in rows])
            return
        if not rows:
            click.echo("No requests yet.")
            return
        click.echo(f"{'ID':>5}  {'CREATED (UTC)':<16}  {'PRODUCT':<12}  {'STATE':<17}  {'DEVICES':>8}  {'REGISTERED':>10}  REQUESTER")
        for request in rows:
            click.echo(
                f"{request.id:>5}  {request.created_at:%Y-%m-%d %H:%M}  {request.product_key:<12}  {request.state:<17}  "
                f"{request.count:>8,}  {service.created_count(request.id):>10,}  {request.requester}"
            )


@cli.command()
@click.argument("request_id", type=int)
@JSON_OPTION
def audit(request_id: int, as_json: bool) -> None:
    """The audit trail of a request: who did what, and when."""
    with reading(load_settings()) as service:
        entries: list[AuditEntry] = service.audit(request_id) if service else []
    if not entries:
        raise Stop(f"there is no request #{request_id}")
    if as_json:
        print_json([{"at": e.at.isoformat(), "actor": e.actor, "event": e.event, "detail": e.detail} for e in entries])
        return
    for entry in entries:
        detail = ", ".join(f"{k}={v}" for k, v in entry.detail.items())
        click.echo(f"{entry.at:%Y-%m-%d %H:%M:%S}  {entry.actor:<20} {entry.event:<20} {detail}")


@cli.command()
@click.argument("ref")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The CSV file to create (readable by you only).")
@click.option("-p", "--product-key", help="The product of an ApplyId that is not in the local database.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def credentials(ref: str, output: Path, product_key: str | None, force: bool) -> None:
    """Write the credentials of the devices of a request (its number: all its ApplyIds in one
    file) or of one ApplyId to a private CSV file.

    The file holds ProductKey, DeviceName, DeviceSecret and IotId, and is created with owner-only
    permissions. Secrets are never printed.
    """
    from bot import report

    settings = load_settings()
    count = 0

    def counted(rows: Iterator[tuple[str, str, str, str]]) -> Iterator[tuple[str, str, str, str]]:
        nonlocal count
        for row in rows:
            count += 1
            yield row

    def write(rows: Callable[[], Iterator[tuple[str, str, str, str]]]) -> None:
        existed = output.exists()
        try:
            report.write_private(output, report.credentials_csv(counted(rows())), overwrite=force)
        except FileExistsError:
            raise Stop(f"{output} exists; add --force to overwrite it") from None
        except BaseException:
            if not existed or force:
                output.unlink(missing_ok=True)  # never leave half a file of secrets behind
            raise

    request = None
    if wiring.database_exists(settings):
        with open_workflow(settings, Terminal()) as workflow:
            request = workflow.requests.find(ref)
            if request is not None:
                number = int(ref.lstrip("#"))
                apply_id = number if number in workflow.requests.apply_ids(request.id) else None
                write(lambda: workflow.requests.credentials(request.id, operator(), apply_id=apply_id))
    if request is None:
        if product_key is None or not ref.isdigit():
            raise Stop(f"no request or ApplyId {ref} in {settings.db_location}; for an ApplyId of another database, add -p PRODUCT_KEY")
        with wiring.iot_client(settings) as client:
            write(lambda: ((product_key, d.name, d.device_secret, d.iot_id) for d in client.iter_devices_by_apply_id(int(ref))))
    click.echo(f"Wrote the credentials of {count:,} device(s) to {output} (readable by you only).")


@cli.group()
def db() -> None:
    """The database: move a deployment from SQLite to PostgreSQL."""


@db.command("copy")
@click.option("--to", "target", required=True, metavar="URL", help="The PostgreSQL database to copy into (postgresql://…); it must be empty.")
@click.option("--from", "source", metavar="PATH", help="The SQLite file to copy [default: IOTREG_DB].")
def db_copy(target: str, source: str | None) -> None:
    """Copy the SQLite database, its whole history, into an empty PostgreSQL database.

    Stop iotreg first; then point IOTREG_DB at the URL and start it again. Requests keep their
    numbers, waiting requests can still be approved, and unfinished ones resume.
    """
    from bot.store import redact_url
    from bot.store.copy import CopyError, copy_sqlite_to_postgres

    if not is_url(target):
        raise click.UsageError("--to: expected a postgresql:// URL")
    if source is None:
        settings = load_settings()
        if is_url(settings.db_path):
            raise click.UsageError(f"IOTREG_DB is already a database URL ({settings.db_location}): give the SQLite file with --from PATH")
        source = settings.db_path
    try:
        copied = copy_sqlite_to_postgres(source, target)
    except CopyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Copied {source} to {redact_url(target)}:")
    click.echo(f"  {'table':<16}{'SQLite':>12}{'PostgreSQL':>12}")
    for row in copied:
        click.echo(f"  {row.table:<16}{row.source:>12,}{row.target:>12,}")
    click.echo("Every table adds up. Next: set IOTREG_DB to the URL and start iotreg again.")


@cli.command()
@click.argument("changes", nargs=-1, metavar="[ACTION=QPS]...")
@JSON_OPTION
def quota(changes: tuple[str, ...], as_json: bool) -> None:
    """The QPS quota of each IoT Platform action that iotreg keeps to. On PostgreSQL, the quotas
    every iotreg process on the database shares: ACTION=QPS changes them for all of them from their
    next call (as IOT_QPS does at start). On SQLite, this process's own: IOT_QPS."""
    settings = load_settings()
    wanted = parse_quotas(",".join(changes), "ACTION=QPS")
    shared = wiring.shared_quotas(settings, wanted)
    if shared is None and wanted:
        raise Stop(f"{settings.db_location} is a SQLite file, served by one process: set its quotas with IOT_QPS ({', '.join(changes)})")
    quotas, changed = shared if shared is not None else (dict(settings.qps), {})
    if as_json:
        print_json({"shared": shared is not None, "quotas": quotas, "changed": {a: {"before": b, "after": q} for a, (b, q) in changed.items()}})
        return
    where = f"shared by every iotreg on {settings.db_location}" if shared is not None else "of this process (IOT_QPS; SQLite)"
    click.echo(f"IoT Platform quotas, calls per second, {where}:")
    for action, qps in sorted(quotas.items()):
        before = changed.get(action, (None, qps))[0]
        click.echo(f"  {action:<32}{qps:>8g}" + (f"  (was {before:g})" if before is not None else ""))


@cli.command()
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Your own device list instead of the sample.")
def demo(file: Path | None) -> None:
    """Play a whole registration in Slack on this machine: the real bot, the IoT Platform emulator
    and a stand-in for Slack. Nothing to set up."""
    from bot.demo import DemoError, run_demo
    from bot.names import DeviceListError

    try:
        result = run_demo(file, out=click.echo)
    except (DemoError, DeviceListError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(0 if result.state == State.DONE else 1)


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), help="HTTP port [default: PORT or 3000].")
@click.option("--host", default="0.0.0.0", show_default=True, help="Interface to listen on (HTTP mode).")
@click.option("--emulator", "use_emulator", is_flag=True, help="Use a built-in IoT Platform emulator instead of Alibaba Cloud (a trial in a real workspace).")
@click.pass_context
def serve(ctx: click.Context, port: int | None, host: str, use_emulator: bool) -> None:
    """Run the Slack bot: HTTP on PORT at POST /slack/events, or Socket Mode when SLACK_APP_TOKEN
    is set; GET /healthz and GET /metrics on PORT in both modes."""
    from bot import server
    from bot.slack.app import required_for_slack

    settings = load_settings()
    logs.configure((ctx.obj or {}).get("verbose", 0), serving=True, json_format=settings.log_format == "json")
    try:
        settings.require("slack_bot_token", *required_for_slack(settings))
        if not use_emulator:
            wiring.credentials(settings)  # no credentials anywhere: say so now, not at the first request
        wiring.rules(settings)  # a bad policy file stops the bot before it serves, saying where
    except (ConfigError, PolicyError) as exc:
        raise click.ClickException(str(exc)) from None
    build = server.emulator_bot(settings) if use_emulator else None
    # Told through the log, so that with IOTREG_LOG_FORMAT=json every line is JSON.
    say = logging.getLogger("bot.cli").info
    if use_emulator:
        say("EMULATOR MODE: devices are created on a built-in emulator, not on Alibaba Cloud")
    where = f"http://{host}:{port or settings.port}"
    if settings.slack_app_token:
        say("connecting to Slack over Socket Mode; health and metrics on %s/healthz and /metrics", where)
    else:
        say("serving Slack on %s/slack/events; health and metrics on /healthz and /metrics", where)
    try:
        server.Server(settings, host=host, port=port, build=build).run()
    except (server.StartupError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port", default=8700, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port."
)
@click.option("--access-key-id", default=None, help="AccessKeyId to accept [default: emulator-key].")
@click.option("--access-key-secret", default=None, help="Its secret [default: a fixed demo secret].")
@click.option(
    "--security-token",
    default=None,
    help="Treat the key as temporary (STS) credentials: every call must carry this security token.",
)
@click.option(
    "--product-key",
    "product_keys",
    multiple=True,
    help="A product to create (repeatable) [default: a1EmuDemo01].",
)
@click.option(
    "--check-seconds",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long CHECK lasts.",
)
@click.option(
    "--create-seconds",
    default=3.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long CREATE lasts.",
)
@click.option(
    "--create-failure-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of devices whose creation fails.",
)
@click.option(
    "--fault-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of calls answered 500/503.",
)
@click.option(
    "--throttle-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of calls answered Throttling.User.",
)
@click.option(
    "--latency",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds added to every call.",
)
@click.option("--no-quotas", is_flag=True, help="Do not enforce the platform's per-action QPS quotas.")
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed for ApplyIds, generated names, failures and faults (repeatable runs; without it ApplyIds are unique across restarts).",
)
def emulator(
    host: str,
    port: int,
    access_key_id: str | None,
    access_key_secret: str | None,
    security_token: str | None,
    product_keys: tuple[str, ...],
    check_seconds: float,
    create_seconds: float,
    create_failure_rate: float,
    fault_rate: float,
    throttle_rate: float,
    latency: float,
    no_quotas: bool,
    seed: int | None,
) -> None:
    """Run a local IoT Platform emulator until Ctrl-C: no Alibaba Cloud account needed."""
    import sys
    import time

    from bot.standins import emulator as emu
    from bot.standins.emulator.server import SWITCH_INTERVAL

    sys.setswitchinterval(SWITCH_INTERVAL)

    try:
        instance = emu.Emulator(
            host=host,
            port=port,
            access_key_id=access_key_id or emu.DEMO_ACCESS_KEY_ID,
            access_key_secret=access_key_secret or emu.DEMO_ACCESS_KEY_SECRET,
            security_token=security_token,
            product_keys=product_keys or (emu.DEMO_PRODUCT_KEY,),
            check_seconds=check_seconds,
            create_seconds=create_seconds,
            create_failure_rate=create_failure_rate,
            seed=seed,
            enforce_quotas=not no_quotas,
            faults=emu.FaultPlan(
                error_rate=fault_rate, throttle_rate=throttle_rate, latency=latency, seed=seed
            ),
        ).start()
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"IoT Platform emulator listening on {instance.endpoint}")
    click.echo(f"product keys: {', '.join(instance.product_keys)}")
    click.echo("point iotreg at it with:")
    for name, value in instance.env().items():
        click.echo(f"  {name}={value}")
    click.echo("Ctrl-C to stop.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        instance.stop()
    click.echo("emulator stopped")
