"""Settings: the one place that reads the environment.

``Settings.from_env(environ)`` parses every variable once into a frozen dataclass. A malformed
value fails at once with :class:`ConfigError` naming the variable; a value that only some commands
need (the Alibaba Cloud keys, say) is checked by :meth:`Settings.require` when that command starts,
so ``iotreg emulator`` runs without cloud credentials.

:meth:`Settings.load` also reads a ``.env`` file: the one in the working directory, or else the one
in iotreg's home (``IOTREG_HOME``, by default ``~/.local/share/iotreg``); variables already set in
the environment win over the file. The database lives in that home too, unless ``IOTREG_DB`` says
otherwise or an ``iotreg.db`` from before is in the working directory: so ``iotreg resume`` finds
the requests of ``iotreg register`` from any folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from dotenv.parser import parse_stream

from bot.aliyun.client import MAX_NAMES_PER_CHECK, SIGNATURES
from bot.aliyun.ratelimit import DEFAULT_QPS
from bot.store import POSTGRES_SCHEMES, is_url, redact_url

DEFAULT_REGION = "cn-shanghai"


class ConfigError(ValueError):
    """A setting is missing or malformed. The message names the variable to set."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything iotreg reads from its environment, parsed and checked."""

    access_key_id: str | None = None
    # repr=False: the secret must never reach a log line or a traceback.
    access_key_secret: str | None = dataclasses.field(default=None, repr=False)
    security_token: str | None = dataclasses.field(default=None, repr=False)
    signature: str = "v1"
    region_id: str = DEFAULT_REGION
    endpoint: str = f"https://iot.{DEFAULT_REGION}.aliyuncs.com"
    instance_id: str | None = None
    qps: Mapping[str, float] = dataclasses.field(default_factory=lambda: DEFAULT_QPS)
    #: The quotas IOT_QPS names (with PostgreSQL, written to the database for every replica).
    qps_overrides: Mapping[str, float] = dataclasses.field(default_factory=dict)
    timeout: float = 10.0
    max_attempts: int = 5
    retry_deadline: float = 60.0
    # A SQLite file or a PostgreSQL URL; repr=False: a URL may hold a password (see db_location).
    db_path: str = dataclasses.field(default="iotreg.db", repr=False)
    home: str | None = None
    poll_interval: float = 5.0
    poll_max_interval: float = 60.0
    poll_timeout: float = 3600.0
    approval_ttl: float = 24 * 3600.0
    chunk_size: int = 10_000
    slack_bot_token: str | None = dataclasses.field(default=None, repr=False)
    slack_signing_secret: str | None = dataclasses.field(default=None, repr=False)
    slack_app_token: str | None = dataclasses.field(default=None, repr=False)
    slack_api_url: str = "https://slack.com/api/"
    port: int = 3000
    approvers: tuple[str, ...] = ()
    allow_self_approval: bool = False
    policy_path: str | None = None
    reminders: tuple[float, ...] = ()
    notify_channel: str | None = None
    credentials_dm: bool = True
    workers: int = 16
    log_format: str = "text"

    # Names of the environment variables behind the fields above, for error messages.
    ENV_NAMES = MappingProxyType(
        {
            "access_key_id": "ALIBABA_CLOUD_ACCESS_KEY_ID",
            "access_key_secret": "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
            "security_token": "ALIBABA_CLOUD_SECURITY_TOKEN",
            "signature": "IOT_SIGNATURE",
            "region_id": "IOT_REGION_ID",
            "endpoint": "IOT_ENDPOINT",
            "instance_id": "IOT_INSTANCE_ID",
            "qps": "IOT_QPS",
            "qps_overrides": "IOT_QPS",
            "timeout": "IOT_TIMEOUT",
            "max_attempts": "IOT_MAX_ATTEMPTS",
            "retry_deadline": "IOT_RETRY_DEADLINE",
            "db_path": "IOTREG_DB",
            "home": "IOTREG_HOME",
            "poll_interval": "IOTREG_POLL_INTERVAL",
            "poll_max_interval": "IOTREG_POLL_MAX_INTERVAL",
            "poll_timeout": "IOTREG_POLL_TIMEOUT",
            "approval_ttl": "IOTREG_APPROVAL_TTL",
            "chunk_size": "IOTREG_CHUNK_SIZE",
            "slack_bot_token": "SLACK_BOT_TOKEN",
            "slack_signing_secret": "SLACK_SIGNING_SECRET",
            "slack_app_token": "SLACK_APP_TOKEN",
            "slack_api_url": "SLACK_API_URL",
            "port": "PORT",
            "approvers": "IOTREG_APPROVERS",
            "allow_self_approval": "IOTREG_ALLOW_SELF_APPROVAL",
            "policy_path": "IOTREG_POLICY",
            "reminders": "IOTREG_REMINDERS",
            "notify_channel": "IOTREG_NOTIFY_CHANNEL",
            "credentials_dm": "IOTREG_CREDENTIALS_DM",
            "workers": "IOTREG_WORKERS",
            "log_format": "IOTREG_LOG_FORMAT",
        }
    )
    #: Every variable read: the fields' and DATABASE_URL (the database when IOTREG_DB is unset, as
    #: platforms that provision PostgreSQL set it).
    VARIABLES = (*dict.fromkeys(ENV_NAMES.values()), "DATABASE_URL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Parse ``environ``; raise :class:`ConfigError` naming the first malformed variable."""
        env = _Env(environ)
        region = env.text("IOT_REGION_ID") or DEFAULT_REGION
        if not re.fullmatch(r"[a-z]{2}(-[a-z0-9]+)+", region):
            raise ConfigError(f"IOT_REGION_ID: {region!r} is not a region id such as cn-shanghai")
        endpoint = env.url("IOT_ENDPOINT") or f"https://iot.{region}.aliyuncs.com"
        signature = (env.text("IOT_SIGNATURE") or "v1").lower()
        if signature not in SIGNATURES:
            raise ConfigError(f"IOT_SIGNATURE: {signature!r} is not one of {', '.join(SIGNATURES)}")
        access_key_id, security_token = env.text("ALIBABA_CLOUD_ACCESS_KEY_ID"), env.text("ALIBABA_CLOUD_SECURITY_TOKEN")
        if security_token and not access_key_id:
            raise ConfigError(
                "ALIBABA_CLOUD_SECURITY_TOKEN is set without ALIBABA_CLOUD_ACCESS_KEY_ID and "
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET: set the three from the same temporary credentials"
            )
        chunk_size = int(env.number("IOTREG_CHUNK_SIZE", MAX_NAMES_PER_CHECK, minimum=1, integer=True))
        if chunk_size > MAX_NAMES_PER_CHECK:
            raise ConfigError(
                f"IOTREG_CHUNK_SIZE: {chunk_size} is above IoT Platform's limit of {MAX_NAMES_PER_CHECK:,} names per check"
            )
        overrides = env.qps("IOT_QPS")
        return cls(
            access_key_id=access_key_id,
            access_key_secret=env.text("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
            security_token=security_token,
            signature=signature,
            region_id=region,
            endpoint=endpoint,
            instance_id=env.text("IOT_INSTANCE_ID"),
            qps=MappingProxyType({**DEFAULT_QPS, **overrides}),
            qps_overrides=overrides,
            timeout=env.number("IOT_TIMEOUT", 10.0, minimum=0.1),
            max_attempts=int(env.number("IOT_MAX_ATTEMPTS", 5, minimum=1, integer=True)),
            retry_deadline=env.number("IOT_RETRY_DEADLINE", 60.0, minimum=0),
            db_path=env.database("IOTREG_DB") or env.database("DATABASE_URL", url_only=True) or default_db(environ),
            home=home(environ),
            poll_interval=env.duration("IOTREG_POLL_INTERVAL", 5.0, minimum=0.05),
            poll_max_interval=env.duration("IOTREG_POLL_MAX_INTERVAL", 60.0, minimum=0.05),
            poll_timeout=env.duration("IOTREG_POLL_TIMEOUT", 3600.0, minimum=1),
            approval_ttl=env.duration("IOTREG_APPROVAL_TTL", 24 * 3600.0, minimum=1),
            chunk_size=chunk_size,
            slack_bot_token=env.token("SLACK_BOT_TOKEN", "xoxb-"),
            slack_signing_secret=env.text("SLACK_SIGNING_SECRET"),
            slack_app_token=env.token("SLACK_APP_TOKEN", "xapp-"),
            slack_api_url=(env.url("SLACK_API_URL") or "https://slack.com/api").rstrip("/") + "/",
            port=int(env.number("PORT", 3000, minimum=1, integer=True)),
            approvers=env.slack_ids("IOTREG_APPROVERS"),
            allow_self_approval=env.flag("IOTREG_ALLOW_SELF_APPROVAL", False),
            policy_path=env.text("IOTREG_POLICY"),
            reminders=env.durations("IOTREG_REMINDERS"),
            notify_channel=env.text("IOTREG_NOTIFY_CHANNEL"),
            credentials_dm=env.flag("IOTREG_CREDENTIALS_DM", True),
            workers=int(env.number("IOTREG_WORKERS", 16, minimum=2, integer=True)),
            log_format=env.choice("IOTREG_LOG_FORMAT", ("text", "json"), "text"),
        )

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, env_file: Path | str | None = None) -> Settings:
        """Settings from ``env_file`` (default: :func:`env_file`, if it exists) overlaid by ``environ``
        (default: the process)."""
        environ = os.environ if environ is None else environ
        path = Path(env_file) if env_file is not None else find_env_file(environ)
        merged: dict[str, str] = {}
        if path is not None and path.is_file():
            merged.update(read_env_file(path))
        merged.update(environ)
        return cls.from_env(merged)

    @property
    def db_location(self) -> str:
        """The database, fit for a log line or a message (a URL's password replaced by ``***``)."""
        return redact_url(self.db_path) if is_url(self.db_path) else self.db_path

    def require(self, *fields: str) -> None:
        """Raise :class:`ConfigError` naming every variable behind ``fields`` that is unset."""
        missing = [self.ENV_NAMES[f] for f in fields if getattr(self, f) in (None, "")]
        if missing:
            raise ConfigError(f"set {', '.join(missing)} (see README, Configuration)")


class _Env:
    """Typed readers over a mapping of variables; an empty value counts as unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def url(self, name: str) -> str | None:
        value = self.text(name)
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ConfigError(f"{name}: {value!r} is not an http(s) URL")
        return value.rstrip("/") if value else None

    def database(self, name: str, *, url_only: bool = False) -> str | None:
        """A SQLite file path or a ``postgresql://`` URL; an error never repeats the URL's password."""
        value = self.text(name)
        if value is None:
            return None
        if "://" not in value:
            if url_only:
                raise ConfigError(f"{name}: expected a postgresql:// URL")
            return value
        scheme = value.split("://", 1)[0]
        if scheme.lower() not in POSTGRES_SCHEMES:
            raise ConfigError(f"{name}: {scheme}:// is not supported: give a SQLite file path or a postgresql:// URL")
        try:
            urlsplit(value).port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise ConfigError(f"{name}: {redact_url(value)} is not a well-formed URL (the port?)") from None
        return value

    def number(self, name: str, default: float, *, minimum: float, integer: bool = False) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise ConfigError(f"{name}: {raw!r} is not {kind}") from None
        if value < minimum:
            raise ConfigError(f"{name}: {raw} is below the minimum of {minimum:g}")
        return value

    def token(self, name: str, prefix: str) -> str | None:
        value = self.text(name)
        if value is not None and not value.startswith(prefix):
            raise ConfigError(f"{name}: expected a token starting with {prefix!r}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise ConfigError(f"{name}: {raw!r} is not one of {', '.join(choices)}")
        return raw.lower()

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: {raw!r} is not true or false")

    def slack_ids(self, name: str) -> tuple[str, ...]:
        """A comma-separated list of user ids (U…, W…) and user group ids (S…)."""
        raw = self.text(name)
        if raw is None:
            return ()
        ids = tuple(part.strip() for part in raw.split(",") if part.strip())
        bad = [i for i in ids if not re.fullmatch(r"[UWS][A-Z0-9]{2,}", i)]
        if bad:
            raise ConfigError(f"{name}: {', '.join(bad)} is not a Slack user id (U…) or user group id (S…)")
        return ids

    def duration(self, name: str, default: float, *, minimum: float) -> float:
        """Seconds, or a number with a unit: ``90``, ``2.5``, ``30s``, ``15m``, ``24h``, ``7d``."""
        raw = self.text(name)
        if raw is None:
            return default
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", raw.lower())
        if not match:
            raise ConfigError(f"{name}: {raw!r} is not a duration such as 30, 30s, 15m, 24h or 7d")
        seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        if seconds < minimum:
            raise ConfigError(f"{name}: {raw} is shorter than the minimum of {minimum:g} s")
        return seconds

    def durations(self, name: str) -> tuple[float, ...]:
        """Comma-separated durations (``1h,4h``), in increasing order."""
        raw = self.text(name)
        if raw is None:
            return ()
        values = tuple(_Env({name: part}).duration(name, 0.0, minimum=1) for part in raw.split(",") if part.strip())
        if list(values) != sorted(set(values)):
            raise ConfigError(f"{name}: {raw!r} must list durations from the earliest to the latest, such as 1h,4h")
        return values

    def qps(self, name: str) -> Mapping[str, float]:
        """``Action=QPS`` pairs separated by commas, each overriding one of :data:`DEFAULT_QPS`."""
        raw = self.text(name)
        return parse_quotas(raw or "", name)


def parse_quotas(raw: str, name: str) -> Mapping[str, float]:
    """``Action=QPS`` pairs separated by commas (``raw`` given as ``name``), each one of :data:`DEFAULT_QPS`."""
    quotas: dict[str, float] = {}
    if raw.strip():
        for pair in raw.split(","):
            action, sep, value = pair.partition("=")
            action = action.strip()
            if not sep or action not in DEFAULT_QPS:
                known = ", ".join(DEFAULT_QPS)
                raise ConfigError(f"{name}: {pair.strip()!r} is not Action=QPS with an Action among {known}")
            try:
                quotas[action] = float(value)
            except ValueError:
                raise ConfigError(f"{name}: {value.strip()!r} for {action} is not a number") from None
            if not (math.isfinite(quotas[action]) and quotas[action] > 0):
                raise ConfigError(f"{name}: the quota for {action} must be a number above 0")
    return MappingProxyType(quotas)


def home(environ: Mapping[str, str]) -> str | None:
    """iotreg's own folder: ``IOTREG_HOME``, or ``iotreg`` in the user's data folder (XDG)."""
    explicit = environ.get("IOTREG_HOME", "").strip()
    if explicit:
        return str(Path(explicit).expanduser())
    data = environ.get("XDG_DATA_HOME", "").strip() or (
        str(Path(environ["HOME"]) / ".local" / "share") if environ.get("HOME", "").strip() else ""
    )
    return str(Path(data) / "iotreg") if data else None


def default_db(environ: Mapping[str, str]) -> str:
    """Where the database is when ``IOTREG_DB`` is not set: an ``iotreg.db`` already in the working
    directory (where iotreg kept it before it had a home), else the home's, else the working directory's."""
    folder = home(environ)
    if folder is None or (not environ.get("IOTREG_HOME", "").strip() and Path("iotreg.db").exists()):
        return "iotreg.db"
    return str(Path(folder) / "iotreg.db")


def find_env_file(environ: Mapping[str, str]) -> Path | None:
    """The ``.env`` to read: the working directory's, else the one in iotreg's home."""
    here = Path(".env")
    if here.is_file():
        return here
    folder = home(environ)
    return Path(folder) / ".env" if folder else None


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines as python-dotenv reads them (comments, ``export``, quotes, escapes), with no
    ``${VAR}`` expansion: a secret with a ``$`` in it stays as written."""
    values: dict[str, str] = {}
    with path.open(encoding="utf-8-sig") as stream:
        for binding in parse_stream(stream):
            if binding.error:
                raise ConfigError(f"{path}:{binding.original.line}: expected KEY=VALUE")
            if binding.key is not None:
                values[binding.key] = binding.value or ""
    return values
