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
