"""A local stand-in for Alibaba Cloud IoT Platform's batch-registration API.

Three layers, state apart from wire format:

- :mod:`bot.standins.emulator.backend`: products, devices and applications, an in-memory state machine on an
  injected clock;
- :mod:`bot.standins.emulator.gateway`: signature, credentials, timestamps, nonces, QPS quotas, injected
  faults and the JSON envelopes, as a pure ``handle(method, params) -> (status, body)``;
- :mod:`bot.standins.emulator.server`: a thin HTTP adapter.

:class:`Emulator` builds and wires all three; ``iotreg emulator``, the tests' ``emulator`` fixture
and the demo use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType

from bot.clock import Clock, SystemClock
from bot.aliyun.ratelimit import DEFAULT_QPS
from bot.standins.emulator.backend import Application, BusinessFault, Device, IotBackend, Status
from bot.standins.emulator.gateway import FaultPlan, Gateway
from bot.standins.emulator.server import EmulatorServer

__all__ = [
    "Application",
    "BusinessFault",
    "DEMO_ACCESS_KEY_ID",
    "DEMO_ACCESS_KEY_SECRET",
    "DEMO_PRODUCT_KEY",
    "Device",
    "Emulator",
    "EmulatorServer",
    "FaultPlan",
    "Gateway",
    "IotBackend",
    "Status",
    "start_emulator",
]

# Demo credentials: obviously not an Alibaba Cloud key pair (real ids start with "LTAI").
DEMO_ACCESS_KEY_ID = "emulator-key"
DEMO_ACCESS_KEY_SECRET = "emulator-secret-not-a-real-key"
DEMO_PRODUCT_KEY = "a1EmuDemo01"  # 11 letters and digits, the shape of a real ProductKey


class Emulator:
    """Backend, gateway and HTTP server in one object, with demo defaults.

    One key pair is accepted (``access_key_id`` / ``access_key_secret``), and with
    ``security_token`` it stands for temporary (STS) credentials: every call must carry that token.
    ``product_keys`` are created empty; ``product_key`` is the first of them.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        access_key_id: str = DEMO_ACCESS_KEY_ID,
        access_key_secret: str = DEMO_ACCESS_KEY_SECRET,
        security_token: str | None = None,
        product_keys: Sequence[str] = (DEMO_PRODUCT_KEY,),
        check_seconds: float = 2.0,
        create_seconds: float = 3.0,
        create_failure_rate: float = 0.0,
        seed: int | None = None,
        precheck: bool = True,
        quotas: Mapping[str, float] = DEFAULT_QPS,
        enforce_quotas: bool = True,
        faults: FaultPlan | None = None,
    ) -> None:
        if not product_keys:
            raise ValueError("the emulator needs at least one product key")
        self.clock: Clock = clock or SystemClock()
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.security_token = security_token or None
        self.product_keys = tuple(product_keys)
        self.backend = IotBackend(
            self.clock,
            check_seconds=check_seconds,
            create_seconds=create_seconds,
            create_failure_rate=create_failure_rate,
            seed=seed,
            precheck=precheck,
        )
        for product_key in self.product_keys:
            self.backend.add_product(product_key)
        self.gateway = Gateway(
            self.backend,
            self.clock,
            {access_key_id: access_key_secret},
            quotas=quotas,
            enforce_quotas=enforce_quotas,
            faults=faults,
            security_tokens={access_key_id: security_token} if security_token else None,
        )
        self.server = EmulatorServer(self.gateway, host, port)

    @property
    def product_key(self) -> str:
        return self.product_keys[0]

    @property
    def endpoint(self) -> str:
        """``http://HOST:PORT`` once started."""
        return self.server.endpoint

    def env(self) -> dict[str, str]:
        """The variables that point iotreg at this emulator."""
        env = {
            "IOT_ENDPOINT": self.endpoint,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": self.access_key_id,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": self.access_key_secret,
        }
        if self.security_token:
            env["ALIBABA_CLOUD_SECURITY_TOKEN"] = self.security_token
        return env

    def start(self) -> Emulator:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_emulator(**options: object) -> Emulator:
    """Build an :class:`Emulator` with ``options`` (its keyword arguments) and start it."""
    return Emulator(**options).start()  # type: ignore[arg-type]
