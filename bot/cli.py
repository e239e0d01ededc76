"""The ``iotreg`` command line: one click group, a sub-command per front end or tool.

Errors reach the user here and only here: a :class:`~bot.config.ConfigError` or an
:class:`~bot.aliyun.errors.IotError` becomes a one-line message and exit status 1.
"""

from __future__ import annotations

import getpass
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from bot import __version__
from bot.domain import ACTIVE_STATES, FINAL_STATES, Origin, Outcome, State
from bot.policy import Policy, PolicyError
from bot.service import RequestService
from bot import wiring
from bot.store import StoreUnavailable, is_url, open_store
from bot.aliyun.client import ApplyStatus
from bot.aliyun.errors import IotError
from bot.clock import SystemClock
from bot.config import ConfigError, Settings
from bot.domain import Event, Request


class Commands(click.Group):
    """The command group; a database that cannot be reached ends any command with its one-line message."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except StoreUnavailable as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iotreg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Register IoT devices in batches on Alibaba Cloud IoT Platform."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="iotreg")


# -- the registration front end ---------------------------------------------------------------

CHECK_DONE = {ApplyStatus.CHECK_SUCCESS.value, ApplyStatus.CHECK_FAILED.value}
CREATE_DONE = {ApplyStatus.CREATE_SUCCESS.value, ApplyStatus.CREATE_FAILED.value}


def operator() -> str:
    """Who is at the terminal, as the audit trail names them."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def load_settings() -> Settings:
    try:
        return Settings.load()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


class TerminalNotifier:
    """The CLI's side of the workflow's notifications: one line per step, on standard error."""

    def __init__(self, requests: RequestService) -> None:
        self.requests = requests

    def deliver(self, event: Event) -> None:
        request = self.requests.get(event.request_id)
        if request is None:
            return
        line = describe_event(event, request)
        if line:
            click.echo(line, err=True)


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
def open_workflow(settings: Settings) -> Iterator[tuple[object, object]]:
    """The workflow for CLI requests, run in this process on the real clock."""
    from bot.jobs import InlineJobs

    clock = SystemClock()
    try:
        workflow = wiring.workflow(
            settings,
            clock=clock,
            notifier=TerminalNotifier,
            jobs=lambda steps: InlineJobs(clock, steps),
            policy=Policy(allow_self_approval=True),  # at the terminal, the operator approves
            origins=frozenset({Origin.CLI}),
        )
    except (ConfigError, OSError, StoreUnavailable) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield workflow, workflow.jobs
    finally:
        workflow.close()


def wait_for(workflow, jobs, request_id: int, label: str, done_statuses: set[str], until: set[str]) -> Request:
    """Run the workflow until the request reaches one of ``until``, with a progress bar of devices."""
    store = workflow.requests
    total = sum(c.size for c in store.chunks(request_id))
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        shown = 0

        def reached() -> bool:
            nonlocal shown
            finished = sum(c.size for c in store.chunks(request_id) if c.status in done_statuses)
            if finished > shown:
                bar.update(finished - shown)
                shown = finished
            return store.get(request_id).state in until

        jobs.run_until(reached)
    jobs.run_due()  # deliver the notifications of the last step
    return store.get(request_id)


def drive(workflow, jobs, request: Request, *, yes: bool, skip_invalid: bool, output: Path | None) -> int:
    """Take a CLI request from wherever it is to the end; returns the exit status."""
    user = operator()
    if request.state == State.CHECKING:
        request = wait_for(workflow, jobs, request.id, "Checking names", CHECK_DONE, set(FINAL_STATES) | {State.AWAITING_APPROVAL})
    if request.state == State.CHECK_FAILED:
        show_invalid(workflow.requests, request.id)
        valid = request.count - workflow.requests.summary(request.id).invalid
        if valid and (skip_invalid or (not yes and click.confirm(f"Register the {valid:,} valid name(s) in a new request?"))):
            request = workflow.requests.retry_valid(request.id, user)
            return drive(workflow, jobs, request, yes=yes, skip_invalid=False, output=output)
        click.echo("Nothing was registered. Fix the names above and run again, or add --skip-invalid.", err=True)
        return finish(workflow, request, output)
    if request.state == State.AWAITING_APPROVAL:
        question = f"Register {request.count:,} device(s) in product {request.product_key}?"
        if yes or click.confirm(question):
            workflow.requests.approve(request.id, user)  # at the terminal, the operator approves
        else:
            workflow.requests.reject(request.id, user, "declined at the terminal")
            jobs.run_due()
            return finish(workflow, workflow.requests.get(request.id), output)
        request = workflow.requests.get(request.id)
    if request.state in (State.APPROVED, State.REGISTERING):
        request = wait_for(workflow, jobs, request.id, "Registering", CREATE_DONE, set(FINAL_STATES))
    return finish(workflow, request, output)


def show_invalid(store: RequestService, request_id: int, limit: int = 20) -> None:
    invalid = store.devices(request_id, outcome=Outcome.INVALID)
    click.echo("Names the platform refused:", err=True)
    for device in invalid[:limit]:
        click.echo(f"  {device.name:<34} {device.reason}", err=True)
    if len(invalid) > limit:
        click.echo(f"  … and {len(invalid) - limit:,} more (see --output)", err=True)


def finish(workflow, request: Request, output: Path | None) -> int:
    """Print the summary table, write the report; 0 only when every device was registered."""
    from bot import report

    summary = workflow.requests.summary(request.id)
    click.echo(f"\nRequest #{request.id} ({request.product_key}): {request.state.label}")
    if request.reason and request.state not in (State.DONE,):
        click.echo(f"  reason: {request.reason}")
    rows = [
        ("registered", summary.created),
        ("failed", summary.failed),
        ("refused by check", summary.invalid),
        ("not registered", summary.pending if request.final else 0),
        ("rejected locally", summary.rejected_locally),
    ]
    for label, count in rows:
        if count or label == "registered":
            click.echo(f"  {label:<18}{count:>10,}")
    failed = workflow.requests.devices(request.id, outcome=Outcome.NOT_CREATED, limit=20)
    if failed:
        click.echo("Devices that failed:")
        for device in failed:
            click.echo(f"  {device.name:<34} {device.reason}")
        if summary.failed > len(failed):
            click.echo(f"  … and {summary.failed - len(failed):,} more")
    if output is not None:
        rows_written = report.write_outcomes(output, workflow.requests, request.id)
        click.echo(f"Wrote {rows_written:,} device outcome(s) to {output}")
    all_done = request.state == State.DONE and not (summary.failed or summary.invalid or summary.pending)
    return 0 if all_done else 1


@cli.command()
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-p", "--product-key", required=True, help="The product to register the devices in.")
@click.option("--count", type=click.IntRange(1, 1_000_000), help="Let the platform name COUNT devices instead of reading FILE.")
@click.option("-y", "--yes", is_flag=True, help="Approve without asking (at the terminal, you are the approver).")
@click.option("--skip-invalid", is_flag=True, help="If the platform refuses some names, register the others.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Write each device's outcome to this CSV file.")
def register(file: Path | None, product_key: str, count: int | None, yes: bool, skip_invalid: bool, output: Path | None) -> None:
    """Register the devices named in FILE (CSV or text, one name a line) in a product.

    Names are checked locally, then by IoT Platform; after your confirmation (or --yes) the
    devices are created. The request is saved as it goes: if this is interrupted, run
    `iotreg resume` to finish it without registering anything twice.
    """
    from bot.names import DeviceListError, read_device_file

    if (file is None) == (count is None):
        raise click.UsageError("give either FILE or --count")
    settings = load_settings()
    devices = None
    if file is not None:
        try:
            with file.open("rb") as source:
                devices = read_device_file(source, filename=file.name)
        except DeviceListError as exc:
            raise click.ClickException(exc.message) from None
        show_rejected(devices)
    request = None
    with open_workflow(settings) as (workflow, jobs):
        try:
            if devices is not None:
                request = workflow.requests.submit(
                    product_key, operator(), devices.devices, origin=Origin.CLI,
                    rejected=devices.rejected, rejected_count=devices.rejected_count,
                )
            else:
                request = workflow.requests.submit_count(product_key, operator(), count, origin=Origin.CLI)
            status = drive(workflow, jobs, request, yes=yes, skip_invalid=skip_invalid, output=output)
        except KeyboardInterrupt:
            saved = f"request #{request.id} is saved: run `iotreg resume` to finish it" if request else "nothing was sent"
            raise click.ClickException(f"interrupted; {saved}") from None
        except IotError as exc:
            raise click.ClickException(str(exc)) from None
    sys.exit(status)


def show_rejected(devices, limit: int = 20) -> None:
    if not devices.rejected_count:
        return
    click.echo(f"{devices.rejected_count:,} line(s) were not valid and will be skipped:", err=True)
    for rejected in devices.rejected[:limit]:
        click.echo(f"  {rejected}", err=True)
    if devices.rejected_count > limit:
        click.echo(f"  … and {devices.rejected_count - limit:,} more (all listed in --output)", err=True)


@cli.command()
@click.argument("request_ids", nargs=-1, type=int)
@click.option("-y", "--yes", is_flag=True, help="Approve waiting requests without asking.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Write the outcomes of the (single) request to this CSV file.")
def resume(request_ids: tuple[int, ...], yes: bool, output: Path | None) -> None:
    """Finish CLI requests that were interrupted (all unfinished ones, or those given)."""
    settings = load_settings()
    status = 0
    with open_workflow(settings) as (workflow, jobs):
        if request_ids:
            requests = [workflow.requests.get(i) for i in request_ids]
            missing = [str(i) for i, r in zip(request_ids, requests) if r is None or r.origin != Origin.CLI]
            if missing:
                raise click.ClickException(f"no CLI request #{', #'.join(missing)}")
        else:
            requests = workflow.requests.requests(states=ACTIVE_STATES, origins=[Origin.CLI], limit=1000)
        if not requests:
            click.echo("No unfinished request.")
            return
        workflow.resume()
        for request in sorted(requests, key=lambda r: r.id):
            if request.final:
                status |= finish(workflow, request, output)
                continue
            try:
                status |= drive(workflow, jobs, request, yes=yes, skip_invalid=False, output=output if len(requests) == 1 else None)
            except IotError as exc:
                raise click.ClickException(str(exc)) from None
    sys.exit(status)


@cli.command()
@click.argument("apply_id", type=int)
@click.option("-p", "--product-key", required=True, help="The product the ApplyId belongs to.")
def status(apply_id: int, product_key: str) -> None:
    """Ask IoT Platform where an ApplyId stands."""
    settings = load_settings()
    try:
        with wiring.iot_client(settings) as client:
            result = client.query_batch_register_device_status(product_key, apply_id)
    except (ConfigError, IotError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"ApplyId {apply_id} ({product_key}): {result.status.value}")
    if result.valid or result.invalid:
        click.echo(f"  valid {len(result.valid):,}, invalid {len(result.invalid):,}")
    for detail in result.details[:20]:
        click.echo(f"  {detail.name:<34} {detail.reason}")
    if len(result.details) > 20:
        click.echo(f"  … and {len(result.details) - 20:,} more")

    chunk = open_store(settings.db_path).chunk_for_apply_id(apply_id)
    if chunk is not None:
        click.echo(f"  part of request #{chunk.request_id}")


@cli.command()
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--state", "states", multiple=True, type=click.Choice(sorted(FINAL_STATES | ACTIVE_STATES)), help="Only requests in this state (repeatable).")
def requests(limit: int, states: tuple[str, ...]) -> None:
    """Recent requests, newest first, with their states and outcomes."""

    store = open_store(load_settings().db_path)
    rows = store.requests(states=states or None, limit=limit)
    if not rows:
        click.echo("No requests yet.")
        return
    click.echo(f"{'ID':>5}  {'CREATED (UTC)':<16}  {'PRODUCT':<12}  {'STATE':<17}  {'DEVICES':>8}  {'REGISTERED':>10}  REQUESTER")
    for request in rows:
        counts = store.outcome_counts(request.id)
        click.echo(
            f"{request.id:>5}  {request.created_at:%Y-%m-%d %H:%M}  {request.product_key:<12}  {request.state:<17}  "
            f"{request.count:>8,}  {counts.get(Outcome.CREATED, 0):>10,}  {request.requester}"
        )


@cli.command()
@click.argument("request_id", type=int)
def audit(request_id: int) -> None:
    """The audit trail of a request: who did what, and when."""

    store = open_store(load_settings().db_path)
    entries = store.audit(request_id)
    if not entries:
        raise click.ClickException(f"there is no request #{request_id}")
    for entry in entries:
        detail = ", ".join(f"{k}={v}" for k, v in entry.detail.items())
        click.echo(f"{entry.at:%Y-%m-%d %H:%M:%S}  {entry.actor:<20} {entry.event:<20} {detail}")


@cli.command()
@click.argument("apply_id", type=int)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The CSV file to create (readable by you only).")
@click.option("-p", "--product-key", help="The product of the ApplyId (looked up in the local database if not given).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def credentials(apply_id: int, output: Path, product_key: str | None, force: bool) -> None:
    """Write the credentials of the devices created for APPLY_ID to a private CSV file.

    The file holds ProductKey, DeviceName, DeviceSecret and IotId, and is created with owner-only
    permissions. Secrets are never printed.
    """
    from bot import report

    settings = load_settings()
    if product_key is None:
        chunk = open_store(settings.db_path).chunk_for_apply_id(apply_id)
        request = open_store(settings.db_path).get(chunk.request_id) if chunk else None
        if request is None:
            raise click.UsageError(f"ApplyId {apply_id} is not in the local database: give --product-key")
        product_key = request.product_key
    count = 0

    def rows() -> Iterator[tuple[str, str, str, str]]:
        nonlocal count
        for device in client.iter_devices_by_apply_id(apply_id):
            count += 1
            yield product_key, device.name, device.device_secret, device.iot_id

    existed = output.exists()
    try:
        with wiring.iot_client(settings) as client:
            report.write_private(output, report.credentials_csv(rows()), overwrite=force)
    except FileExistsError:
        raise click.ClickException(f"{output} exists; add --force to overwrite it") from None
    except (ConfigError, IotError, OSError) as exc:
        if not existed or force:
            output.unlink(missing_ok=True)  # never leave half a file of secrets behind
        raise click.ClickException(str(exc)) from None
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
def serve(port: int | None, host: str, use_emulator: bool) -> None:
    """Run the Slack bot: HTTP on PORT at POST /slack/events (GET /healthz), or Socket Mode when
    SLACK_APP_TOKEN is set."""
    from bot import server

    settings = load_settings()
    try:
        settings.require("slack_bot_token", "slack_signing_secret")
        if not use_emulator:
            wiring.credentials(settings)  # no credentials anywhere: say so now, not at the first request
        wiring.rules(settings)  # a bad policy file stops the bot before it serves, saying where
    except (ConfigError, PolicyError) as exc:
        raise click.ClickException(str(exc)) from None
    build = server.emulator_bot(settings) if use_emulator else None
    if use_emulator:
        click.echo("iotreg: EMULATOR MODE: devices are created on a built-in emulator, not on Alibaba Cloud", err=True)
    if settings.slack_app_token:
        click.echo("iotreg: connecting to Slack over Socket Mode", err=True)
        server.socket_mode(settings, build=build)
    else:
        click.echo(f"iotreg: serving Slack on http://{host}:{port or settings.port}/slack/events", err=True)
        server.Server(settings, host=host, port=port, build=build).run()


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
    import time

    from bot.standins import emulator as emu

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
