"""A real PostgreSQL for the tests: one throwaway cluster per session, a fresh schema per test.

The cluster is :class:`bot.standins.postgres.TempCluster` (``initdb`` and ``pg_ctl`` in a temporary
folder, run as the ``postgres`` user when the tests run as root). Where no PostgreSQL is installed
the tests that need it are skipped with one line saying how to get it, except under ``CI=true``,
where they fail: CI must run them.

Each test gets a schema of its own, named first in its URL's ``search_path``: to the store it is an
empty database, and it takes milliseconds where ``CREATE DATABASE`` takes most of a second.
"""

from __future__ import annotations

import itertools
import os

import pytest

from bot.standins.postgres import ClusterUnavailable, TempCluster

_numbers = itertools.count(1)


def start_cluster() -> TempCluster:
    """A running cluster, or skip (fail under CI) saying why there is none."""
    try:
        cluster = TempCluster()
    except ClusterUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{exc} (CI=true: the PostgreSQL tests must run, not skip)", pytrace=False)
        pytest.skip(str(exc))
    try:
        return cluster.start()
    except BaseException:
        cluster.destroy()
        raise


def fresh_database(cluster: TempCluster) -> str:
    """The URL of a new, empty schema (the store applies its migrations when it opens it)."""
    if not cluster.running:  # a test that stopped the server failed before starting it again
        cluster.start()
    schema = f"test_{os.getpid()}_{next(_numbers)}"
    with cluster.admin() as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return cluster.url("postgres") + f"?options=-csearch_path%3D{schema}"
