"""Where iotreg's parts are built from the settings and wired together, with constructors only.

The subpackages for outside systems (:mod:`bot.aliyun`, :mod:`bot.standins`) take plain values;
this module is where :class:`~bot.config.Settings` becomes those values.

Credentials: an AccessKey set in the settings (``ALIBABA_CLOUD_ACCESS_KEY_ID`` and
``ALIBABA_CLOUD_ACCESS_KEY_SECRET``, with ``ALIBABA_CLOUD_SECURITY_TOKEN`` for temporary ones) is
used as it is. Without one, the official ``alibabacloud-credentials`` default chain finds them:
the credentials file (``~/.alibabacloud/credentials``, profile ``ALIBABA_CLOUD_PROFILE``), OIDC/RRSA
on ACK (``ALIBABA_CLOUD_ROLE_ARN``, ``ALIBABA_CLOUD_OIDC_PROVIDER_ARN``,
``ALIBABA_CLOUD_OIDC_TOKEN_FILE``), the ECS instance RAM role; it refreshes temporary credentials
before they expire, and the client asks it at every call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any
from pathlib import Path

import requests

from bot.aliyun import errors
from bot.aliyun.client import MAX_COUNT_PER_REGISTER, Credentials, CredentialsProvider, IotClient, RetryPolicy
from bot.aliyun.ratelimit import DEFAULT_QPS, Limiter, SharedRateLimiter, shared_limiter
from bot.clock import Clock, SystemClock
from bot.config import ConfigError, Settings
from bot.domain import Origin, Rule, Timing
from bot.policy import Policy, load_rules
from bot.registration import Jobs, Notifier, Steps, Workflow
from bot.service import RequestService
from bot.store import Store, is_url, open_store

log = logging.getLogger(__name__)

#: The rate limiter's account when the chain gives credentials: its AccessKeyIds rotate, the
#: account's quotas do not.
CHAIN_ACCOUNT = "default credentials chain"

NO_CREDENTIALS = (
    "no Alibaba Cloud credentials: set ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET, "
    "or run on ECS or ACK with a RAM role, or use a credentials file (README, Connect to Alibaba Cloud)"
)


def _default_chain_client() -> Any:
    # Imported here: the library reads its environment variables when it is first imported.
    from alibabacloud_credentials.client import Client

    return Client()


class DefaultChain:
    """The official default credentials chain as a :class:`~bot.aliyun.client.CredentialsProvider`.

    Built at the first call (the chain looks at the environment, files and the metadata service
    then), and asked again at every call: it hands out refreshed credentials before the old ones
    expire. ``client_factory`` returns an ``alibabacloud_credentials.client.Client``.
    """

    def __init__(self, client_factory: Callable[[], Any] = _default_chain_client) -> None:
        self._factory = client_factory
        self._client: Any = None
        self._lock = threading.Lock()

    def current(self) -> Credentials:
        try:
            with self._lock:
                if self._client is None:
                    self._client = self._factory()
            model = self._client.get_credential()
        except Exception as exc:  # the chain's CredentialException, and whatever its providers raise
            # The chain's own words, shortened: they say which sources it tried and why each failed.
            raise errors.AuthError(f"{NO_CREDENTIALS}; {str(exc)[:300]}") from None
        if not model.access_key_id or not model.access_key_secret:
            raise errors.AuthError(NO_CREDENTIALS)
        return Credentials(model.access_key_id, model.access_key_secret, model.security_token or None)


def credentials(settings: Settings, *, chain: Callable[[], CredentialsProvider] = DefaultChain) -> CredentialsProvider:
    """The AccessKey of the settings, or the default chain when none is set (checked at once, so
    that a process without credentials stops at start with :class:`~bot.config.ConfigError`)."""
    if settings.access_key_id or settings.access_key_secret:
        settings.require("access_key_id", "access_key_secret")  # one without the other: name the missing one
        assert settings.access_key_id and settings.access_key_secret
        return Credentials(settings.access_key_id, settings.access_key_secret, settings.security_token)
    provider = chain()
    try:
        provider.current()
    except errors.AuthError as exc:
        raise ConfigError(exc.message) from None
    return provider


def iot_client(
    settings: Settings,
    *,
    session: requests.Session | None = None,
    clock: Clock | None = None,
    chain: Callable[[], CredentialsProvider] = DefaultChain,
    observer: Callable[[str, str, float], None] | None = None,
    store: Store | None = None,
) -> IotClient:
    """A client for the configured account; ``observer`` is told of every call (the metrics).

    Its rate limiter books every call in the database when that serves several processes
    (PostgreSQL: ``store``, or one opened on IOTREG_DB for the client alone), so that the replicas
    share the account's quotas; else it is the process-wide limiter of the account."""
    provider = credentials(settings, chain=chain)
    clock = clock or SystemClock()
    account = provider.access_key_id if isinstance(provider, Credentials) else CHAIN_ACCOUNT
    return IotClient(
        settings.endpoint,
        provider,
        signature=settings.signature,
        region_id=settings.region_id,
        instance_id=settings.instance_id,
        session=session,
        timeout=settings.timeout,
        retry=RetryPolicy(max_attempts=settings.max_attempts, deadline=settings.retry_deadline),
        limiter=limiter(settings, account, clock, store),
        clock=clock,
        observer=observer,
    )


def limiter(settings: Settings, account: str, clock: Clock, store: Store | None = None) -> Limiter:
    """The limiter of the account's quotas: booked in the database that several processes share,
    with IOT_QPS written there for all of them; else in this process, with IOT_QPS as it is."""
    opened = store is None and is_url(settings.db_path)
    if opened:
        store = open_store(settings.db_path)
    if store is None or not store.many_processes:
        return shared_limiter(account, settings.endpoint, settings.qps, clock)
    try:
        share_quotas(store, settings.qps_overrides)
    except BaseException:
        if opened:
            store.close()
        raise
    return SharedRateLimiter(store, clock, owns_keeper=opened)


def share_quotas(store: Store, overrides: Mapping[str, float]) -> dict[str, tuple[float | None, float]]:
    """Give the database the platform's quotas it has not got yet, then ``overrides`` (IOT_QPS),
    which every process booking there will use from its next call; log the overrides that changed
    anything, in one line."""
    store.set_quotas(DEFAULT_QPS, replace=False)
    changed = store.set_quotas(overrides) if overrides else {}
    if changed:
        told = ", ".join(f"{action} {'unset' if before is None else f'{before:g}'} -> {after:g}/s" for action, (before, after) in changed.items())
        log.info("changed the quotas that every iotreg on %s shares: %s", store.location, told, extra={"quotas": dict(overrides)})
    return changed


def shared_quotas(settings: Settings, changes: Mapping[str, float]) -> tuple[dict[str, float], dict[str, tuple[float | None, float]]] | None:
    """The quotas every process on the settings' server database shares, after ``changes`` (as an
    IOT_QPS would make them), and what changed; ``None`` for a SQLite file (each process keeps its own)."""
    if not is_url(settings.db_path):
        return None
    store = open_store(settings.db_path)
    try:
        changed = share_quotas(store, changes)
        return store.quotas(), changed
    finally:
        store.close()


def timing(settings: Settings) -> Timing:
    """How the workflow paces itself, from the settings."""
    return Timing(
        poll_interval=settings.poll_interval,
        poll_max_interval=max(settings.poll_interval, settings.poll_max_interval),
        phase_timeout=settings.poll_timeout,
        approval_ttl=settings.approval_ttl,
        chunk_size=min(settings.chunk_size, MAX_COUNT_PER_REGISTER),
        reminders=settings.reminders,
    )


def rules(settings: Settings) -> tuple[Rule, dict[str, Rule]]:
    """The default and per-product approval rules: from ``IOTREG_POLICY``'s file, over today's
    settings (``IOTREG_APPROVERS``, ``IOTREG_ALLOW_SELF_APPROVAL``, one approval). Raises
    :class:`~bot.policy.PolicyError` (``file:line: what``) for a bad file."""
    base = Rule(approvers=settings.approvers, self_approval=settings.allow_self_approval, source="settings")
    if not settings.policy_path:
        return base, {}
    return load_rules(settings.policy_path, base)


def workflow(
    settings: Settings,
    *,
    clock: Clock,
    notifier: Callable[[RequestService], Notifier],
    jobs: Callable[[Steps], Jobs],
    client: IotClient | None = None,
    store: Store | None = None,
    policy: Policy | None = None,
    origins: frozenset[Origin] | None = None,
    api: bool = True,
) -> Workflow:
    """The workflow over the configured database and IoT Platform account.

    ``api=False``: without an IoT client, for what needs no API call (queries, a cancel); such a
    workflow must not be resumed. The client is built first, so that a missing AccessKey stops a
    command before it creates a database file (a server database is opened first: the client's
    limiter books its calls there).
    """
    if client is None and api:
        if store is None and is_url(settings.db_path):
            store = open_store(settings.db_path)  # the client books its calls in a server database
        client = iot_client(settings, clock=clock, store=store)
    return Workflow(
        store or open_store(settings.db_path),
        client,
        clock,
        timing(settings),
        notifier=notifier,
        jobs=jobs,
        policy=policy or Policy(allow_self_approval=settings.allow_self_approval),
        origins=origins,
    )


def database_exists(settings: Settings) -> bool:
    """Whether there is a database to read: a SQLite file that is not there yet has no requests,
    and a query should not create it (a server database always counts as there)."""
    return is_url(settings.db_path) or Path(settings.db_path).exists()


def prepare_home(settings: Settings) -> None:
    """Create iotreg's home folder when the database is to be made in it."""
    if settings.home and not is_url(settings.db_path) and Path(settings.db_path).parent == Path(settings.home):
        Path(settings.home).mkdir(parents=True, exist_ok=True)
