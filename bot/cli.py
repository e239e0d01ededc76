"""The ``iotreg`` command line: one click group, a sub-command per front end or tool.

Errors reach the user here and only here: a :class:`~bot.config.ConfigError` or an
:class:`~bot.aliyun.errors.IotError` becomes a one-line message and exit status 1.
"""

from __future__ import annotations

import logging

import click

from bot import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iotreg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Register IoT devices in batches on Alibaba Cloud IoT Platform."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="iotreg")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port", default=8700, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port."
)
@click.option("--access-key-id", default=None, help="AccessKeyId to accept [default: emulator-key].")
@click.option("--access-key-secret", default=None, help="Its secret [default: a fixed demo secret].")
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
    "--seed", type=int, default=None, help="Seed for generated ids, failures and faults (repeatable runs)."
)
def emulator(
    host: str,
    port: int,
    access_key_id: str | None,
    access_key_secret: str | None,
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

    from bot import emulator as emu

    try:
        instance = emu.Emulator(
            host=host,
            port=port,
            access_key_id=access_key_id or emu.DEMO_ACCESS_KEY_ID,
            access_key_secret=access_key_secret or emu.DEMO_ACCESS_KEY_SECRET,
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
