"""The IoT Platform's batch-registration state, in memory: products, devices and applications.

No HTTP and no signatures here (that is :mod:`bot.standins.emulator.gateway`); every method takes the
operation's parameters as the wire carries them (strings, or ``None`` when absent) and returns the
``Data`` object of the response, with the exact wire keys (alibaba-iot-api.md, "Responses"). A
business failure raises :class:`BusinessFault`, which the gateway turns into HTTP 200 with
``Success: false``.

An application (one ``ApplyId``) moves through these states, lazily, on the injected clock::

    BatchCheckDeviceNames ─> CHECK ─(check_seconds)─┬─> CHECK_SUCCESS ─(register)─> CREATE
                                                    └─> CHECK_FAILED
    BatchRegisterDevice ─────────────────────────────────────────────────────────> CREATE
    CREATE ─(create_seconds)─┬─> CREATE_SUCCESS
                             └─> CREATE_FAILED   (some devices failed; the others exist)

Outcomes are decided at the moment a deadline passes, in deadline order across all applications,
so a name that another application creates in between makes this one fail, as on the platform.

Where the documentation is silent, the choice made is written next to the code, with its evidence.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import math
import random
import re
import string
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone

from bot.clock import Clock

__all__ = [
    "BusinessFault",
    "Status",
    "Device",
    "Application",
    "IotBackend",
    "MAX_NAMES_PER_CHECK",
    "MAX_REGISTER_COUNT",
    "MAX_PAGE_SIZE",
    "FIRST_APPLY_ID",
    "is_valid_device_name",
    "is_valid_nickname",
    "nickname_width",
]

MAX_NAMES_PER_CHECK = 10_000
MAX_REGISTER_COUNT = 10_000
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 50
MAX_PRODUCT_PAGE_SIZE = 200  # QueryProductList
#: The ApplyId in every example of the API reference; a seeded emulator counts up from there.
FIRST_APPLY_ID = 1_295_006
#: An unseeded emulator starts at FIRST_APPLY_ID plus the microseconds since this moment, so that
#: an emulator started again (while iotreg keeps its database) never hands out an ApplyId of an
#: earlier run: no run hands out a million ApplyIds a second.
_APPLY_ID_EPOCH = datetime(2020, 1, 1, tzinfo=timezone.utc)

# Per-device messages (InvalidDetailList ErrorMsg). Several for one device are joined with "|"
# (doc 69483, InvalidDetailList.ErrorMsg).
MSG_INVALID_NAME = "The device name is illegal."
MSG_REPEATED_NAME = "The device name is repeated."
MSG_NAME_EXISTS = "The device name already exists."
MSG_INVALID_NICKNAME = "The nick name is illegal."
MSG_NICKNAME_EXISTS = "The nick name already exists."
MSG_CREATE_FAILED = "Failed to create the device."

_DEVICE_NAME = re.compile(r"[A-Za-z0-9\-_@.:]{4,32}")
# Real ProductKeys are 11 letters and digits; the emulator accepts 4 to 32 so tests may pick names.
_PRODUCT_KEY = re.compile(r"[A-Za-z0-9]{4,32}")
_ALNUM = string.ascii_letters + string.digits


class BusinessFault(Exception):
    """The platform ran the call and refused it: HTTP 200, ``Success: false``, ``Code``.

    ``data`` is sent as ``Data`` next to the code when present (BatchCheckDeviceNames' lists).
    """

    def __init__(self, code: str, message: str, data: Mapping[str, object] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = dict(data) if data is not None else None


class Status(enum.StrEnum):
    """``Data.Status`` of QueryBatchRegisterDeviceStatus."""

    CHECK = "CHECK"
    CHECK_SUCCESS = "CHECK_SUCCESS"
    CHECK_FAILED = "CHECK_FAILED"
    CREATE = "CREATE"
    CREATE_SUCCESS = "CREATE_SUCCESS"
    CREATE_FAILED = "CREATE_FAILED"


@dataclasses.dataclass(frozen=True)
class Device:
    """A created device."""

    product_key: str
    device_name: str
    nickname: str | None
    iot_id: str
    device_secret: str = dataclasses.field(repr=False)
    device_id: str  # legacy identifier, still returned by QueryPageByApplyId
    apply_id: int | None


@dataclasses.dataclass(frozen=True)
class Application:
    """A snapshot of one application (ApplyId), for tests and the demo."""

    apply_id: int
    product_key: str
    status: Status
    names: tuple[str, ...]
    nicknames: Mapping[str, str]
    #: Failed names of the last finished phase, each with its reasons.
    failures: Mapping[str, tuple[str, ...]]
    created: tuple[str, ...]
    register_calls: int
    generated: bool  # from BatchRegisterDevice (names chosen by the platform)


@dataclasses.dataclass(eq=False)
class _Product:
    key: str
    instance_id: str | None
    created_ms: int = 0
    devices: dict[str, Device] = dataclasses.field(default_factory=dict)
    nicknames: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(eq=False)
class _Application:
    apply_id: int
    product_key: str
    entries: list[tuple[str, str | None]]
    status: Status
    deadline: float
    generated: bool = False
    failures: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    created: list[str] = dataclasses.field(default_factory=list)
    register_calls: int = 0


def _first_apply_id(now: datetime) -> int:
    return FIRST_APPLY_ID + int((now - _APPLY_ID_EPOCH).total_seconds() * 1_000_000)


def is_valid_device_name(name: str) -> bool:
    """4 to 32 characters of ``A-Z a-z 0-9 - _ @ . :``."""
    return _DEVICE_NAME.fullmatch(name) is not None


def _is_wide(char: str) -> bool:
    """CJK ideographs and Japanese kana: two units of a nickname's length each."""
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0x3040 <= code <= 0x30FF  # hiragana and katakana
    )


def nickname_width(nickname: str) -> int | None:
    """The nickname's length as the platform counts it (CJK/kana count 2), or None if a character is
    not allowed (only CJK, kana, ASCII letters, digits and ``_`` are)."""
    width = 0
    for char in nickname:
        if char.isascii() and (char.isalnum() or char == "_"):
            width += 1
        elif _is_wide(char):
            width += 2
        else:
            return None
    return width


def is_valid_nickname(nickname: str) -> bool:
    """4 to 64 units of CJK, kana, letters, digits and ``_``; a CJK or kana character counts 2."""
    width = nickname_width(nickname)
    return width is not None and 4 <= width <= 64


class IotBackend:
    """The platform's state for the five batch-registration operations. Thread-safe (one lock).

    ``check_seconds`` and ``create_seconds`` are how long CHECK and CREATE last on ``clock``.
    ``create_failure_rate`` is the share of devices whose creation fails, drawn from a generator
    seeded with ``seed`` (deterministic for a given seed and order of calls). With a ``seed`` the
    ApplyIds are repeatable too (from :data:`FIRST_APPLY_ID`); without one they start from the
    clock's now, so that they are unique across restarts.

    ``precheck``: BatchCheckDeviceNames refuses at once a list with malformed or repeated names or
    malformed nicknames, and returns the lists of them in ``Data``; the SDK models document those
    lists as "returned if the call fails" (alibabacloud-iot20180120 BatchCheckDeviceNamesResponseBody).
    With ``precheck=False`` every defect is found by the asynchronous check instead and shows in
    QueryBatchRegisterDeviceStatus as CHECK_FAILED (doc 69483's example: "The nick name is
    illegal." in InvalidDetailList). A client must handle both; the emulator can play either.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        check_seconds: float = 2.0,
        create_seconds: float = 3.0,
        create_failure_rate: float = 0.0,
        seed: int | None = None,
        precheck: bool = True,
    ) -> None:
        if check_seconds < 0 or create_seconds < 0:
            raise ValueError("check_seconds and create_seconds must be 0 or more")
        if not 0.0 <= create_failure_rate <= 1.0:
            raise ValueError("create_failure_rate is a share between 0 and 1")
        self._clock = clock
        self.check_seconds = check_seconds
        self.create_seconds = create_seconds
        self.create_failure_rate = create_failure_rate
        self.precheck = precheck
        # Two generators, so that the failure draws do not depend on how many ids were generated.
        self._ids = random.Random(seed)
        self._failures = random.Random(None if seed is None else seed + 1)
        self._lock = threading.RLock()
        self._products: dict[str, _Product] = {}
        self._applications: dict[int, _Application] = {}
        self._deadlines: list[tuple[float, int]] = []  # (deadline, apply_id), a heap
        self._next_apply_id = FIRST_APPLY_ID if seed is not None else _first_apply_id(clock.now())

    # ----------------------------------------------------------------- set-up and introspection

    def add_product(self, product_key: str, instance_id: str | None = None) -> None:
        """Create a product (idempotent). ``instance_id``: calls must then send it as IotInstanceId."""
        if not _PRODUCT_KEY.fullmatch(product_key):
            raise ValueError(f"{product_key!r} is not a ProductKey (4-32 letters and digits)")
        with self._lock:
            existing = self._products.get(product_key)
            if existing is not None and existing.instance_id != (instance_id or None):
                raise ValueError(f"product {product_key} exists in another instance")
            created = int(self._clock.now().timestamp() * 1000)
            self._products.setdefault(product_key, _Product(product_key, instance_id or None, created))

    def add_device(self, product_key: str, device_name: str, nickname: str | None = None) -> Device:
        """Create a device directly, as if made earlier in the console (to set up name clashes)."""
        with self._lock:
            self._settle()
            product = self._products[product_key]
            if device_name in product.devices:
                raise ValueError(f"{device_name} already exists in {product_key}")
            return self._create_device(product, device_name, nickname, apply_id=None)

    def devices(self, product_key: str) -> list[Device]:
        """The product's devices, in order of creation."""
        with self._lock:
            self._settle()
            return list(self._products[product_key].devices.values())

    def application(self, apply_id: int) -> Application:
        """A snapshot of the application, its status brought up to the clock's now."""
        with self._lock:
            self._settle()
            app = self._applications[int(apply_id)]
            return Application(
                apply_id=app.apply_id,
                product_key=app.product_key,
                status=app.status,
                names=tuple(name for name, _ in app.entries),
                nicknames={name: nick for name, nick in app.entries if nick},
                failures={name: tuple(reasons) for name, reasons in app.failures.items()},
                created=tuple(app.created),
                register_calls=app.register_calls,
                generated=app.generated,
            )

    def applications(self) -> list[int]:
        """Every ApplyId handed out, in order."""
        with self._lock:
            return list(self._applications)

    # ----------------------------------------------------------------------------- operations

    def batch_check_device_names(
        self,
        product_key: str | None,
        entries: Sequence[tuple[str | None, str | None]],
        *,
        iot_instance_id: str | None = None,
    ) -> dict[str, object]:
        """BatchCheckDeviceNames: ``entries`` are ``(DeviceName, DeviceNickname or None)`` in order."""
        with self._lock:
            self._settle()
            product = self._product(product_key, iot_instance_id)
            if not entries:
                raise BusinessFault("iot.device.NoneDeviceNameElement", "The device name list is empty.")
            # Refused whole rather than cut short: names dropped without a word would be lost.
            if len(entries) > MAX_NAMES_PER_CHECK:
                raise BusinessFault(
                    "iot.device.DeviceCountExceeded",
                    f"At most {MAX_NAMES_PER_CHECK} device names can be checked at once, not {len(entries)}.",
                )
            if any(not name for name, _ in entries):
                raise BusinessFault("iot.device.NullDeviceName", "The device name cannot be empty.")
            clean = [(str(name), nick or None) for name, nick in entries]
            if self.precheck:
                self._precheck(clean)
            app = self._new_application(product, clean, Status.CHECK, self.check_seconds)
            return {"ApplyId": app.apply_id}

    def batch_register_device_with_apply_id(
        self,
        product_key: str | None,
        apply_id: str | int | None,
        *,
        iot_instance_id: str | None = None,
    ) -> dict[str, object]:
        """BatchRegisterDeviceWithApplyId: start creating the devices of a CHECK_SUCCESS application."""
        with self._lock:
            self._settle()
            product = self._product(product_key, iot_instance_id)
            app = self._application_of(product, apply_id)
            app.register_calls += 1
            # The documentation names no code for these refusals; each gets the closest documented
            # one (doc 87387, device codes): "the device creation task is still in progress" while
            # the application is being worked on, "failed to batch register devices" when it can
            # never be registered (again).
            if app.status is Status.CHECK:
                raise BusinessFault(
                    "iot.device.CreateDeviceTaskIsRunning", "The device names are still being checked."
                )
            if app.status is Status.CHECK_FAILED:
                raise BusinessFault(
                    "iot.device.ApplyManyDevicesFailed",
                    "The application failed its name check; check corrected names for a new ApplyId.",
                )
            if app.status is Status.CREATE:
                raise BusinessFault(
                    "iot.device.CreateDeviceTaskIsRunning",
                    "The devices of this application are being created.",
                )
            if app.status in (Status.CREATE_SUCCESS, Status.CREATE_FAILED):
                raise BusinessFault(
                    "iot.device.ApplyManyDevicesFailed",
                    "The devices of this application were already created.",
                )
            self._start_create(app)
            return {"ApplyId": app.apply_id}

    def batch_register_device(
        self,
        product_key: str | None,
        count: str | int | None,
        *,
        iot_instance_id: str | None = None,
    ) -> dict[str, object]:
        """BatchRegisterDevice: ``count`` devices with names chosen by the platform."""
        with self._lock:
            self._settle()
            product = self._product(product_key, iot_instance_id)
            number = _parse_int(count)
            if number is None or number < 1:
                # Not among the flow's codes; the common "parameter format" code of doc 87387.
                raise BusinessFault(
                    "iot.common.InvalidFormattedParameter", f"Count {count!r} is not a number of devices."
                )
            if number > MAX_REGISTER_COUNT:
                raise BusinessFault(
                    "iot.device.DeviceCountExceeded",
                    f"At most {MAX_REGISTER_COUNT} devices can be applied for at once.",
                )
            taken = set(product.devices)
            names: list[tuple[str, str | None]] = []
            while len(names) < number:
                name = "".join(self._ids.choices(_ALNUM, k=20))
                if name not in taken:
                    taken.add(name)
                    names.append((name, None))
            app = self._new_application(product, names, Status.CREATE, self.create_seconds, generated=True)
            return {"ApplyId": app.apply_id}

    def query_batch_register_device_status(
        self,
        product_key: str | None,
        apply_id: str | int | None,
        *,
        iot_instance_id: str | None = None,
    ) -> dict[str, object]:
        """QueryBatchRegisterDeviceStatus: ``Status`` and, after a failed phase, which names failed."""
        with self._lock:
            self._settle()
            product = self._product(product_key, iot_instance_id)
            app = self._application_of(product, apply_id)
            valid: list[str] = []
            invalid: list[str] = []
            details: list[dict[str, str]] = []
            # Both lists are empty on the _SUCCESS states and while a phase runs (doc 69483).
            if app.status in (Status.CHECK_FAILED, Status.CREATE_FAILED):
                nick_of = dict(reversed(app.entries))  # first occurrence wins
                for name in _unique(name for name, _ in app.entries):
                    if name in app.failures:
                        invalid.append(name)
                        detail = {"DeviceName": name}
                        if nick_of.get(name):
                            detail["NickName"] = nick_of[name]
                        detail["ErrorMsg"] = "|".join(app.failures[name])
                        details.append(detail)
                    else:
                        valid.append(name)
            return {
                "Status": str(app.status),
                "ValidList": {"Name": valid},
                "InvalidList": {"Name": invalid},
                "InvalidDetailList": {"invalidDetailList": details},
            }

    def query_page_by_apply_id(
        self,
        apply_id: str | int | None,
        *,
        current_page: str | int | None = None,
        page_size: str | int | None = None,
        iot_instance_id: str | None = None,
    ) -> dict[str, object]:
        """QueryPageByApplyId: the created devices, a page at a time. Returned fields go at the top
        level of the response, not under ``Data`` (alibaba-iot-api.md)."""
        with self._lock:
            self._settle()
            app = self._find_application(apply_id)
            owner = self._products[app.product_key]
            if owner.instance_id != (iot_instance_id or None):
                raise BusinessFault("iot.device.DeviceApplyIsNotFound", "The ApplyId is not found.")
            page = 1 if current_page in (None, "") else _parse_int(current_page)
            size = DEFAULT_PAGE_SIZE if page_size in (None, "") else _parse_int(page_size)
            if page is None or size is None or page < 1 or not 1 <= size <= MAX_PAGE_SIZE:
                raise BusinessFault(
                    "iot.common.InvalidPageParams",
                    f"CurrentPage must be 1 or more and PageSize 1 to {MAX_PAGE_SIZE}.",
                )
            created = [owner.devices[name] for name in app.created]
            chunk = created[(page - 1) * size : page * size]
            return {
                "Page": page,
                "PageSize": size,
                "PageCount": math.ceil(len(created) / size),
                "Total": len(created),
                "ApplyDeviceList": {
                    "ApplyDeviceInfo": [
                        {
                            "DeviceId": device.device_id,
                            "DeviceName": device.device_name,
                            "DeviceSecret": device.device_secret,
                            "IotId": device.iot_id,
                        }
                        for device in chunk
                    ]
                },
            }

    def query_product_list(
        self, current_page: str | int | None, page_size: str | int | None, *, iot_instance_id: str | None = None
    ) -> dict[str, object]:
        """QueryProductList: the instance's products, a page at a time (PageSize at most 200)."""
        page, size = _parse_int(current_page), _parse_int(page_size)
        if page is None or size is None or page < 1 or not 1 <= size <= MAX_PRODUCT_PAGE_SIZE:
            raise BusinessFault(
                "iot.common.InvalidPageParams", f"CurrentPage must be 1 or more and PageSize 1 to {MAX_PRODUCT_PAGE_SIZE}."
            )
        with self._lock:
            products = [p for p in self._products.values() if p.instance_id == (iot_instance_id or None)]
            chunk = products[(page - 1) * size : page * size]
            return {
                "CurrentPage": page,
                "PageSize": size,
                "PageCount": math.ceil(len(products) / size),
                "Total": len(products),
                "List": {
                    "ProductInfo": [
                        {
                            "ProductKey": p.key, "ProductName": p.key, "NodeType": 0, "DataFormat": 1,
                            "DeviceCount": len(p.devices), "GmtCreate": p.created_ms, "Description": "",
                            "AuthType": "secret",
                        }
                        for p in chunk
                    ]
                },
            }

    # ------------------------------------------------------------------------------ internals

    def _product(self, product_key: str | None, instance_id: str | None) -> _Product:
        if not product_key:
            raise BusinessFault("iot.prod.NullProductKey", "The ProductKey cannot be empty.")
        if not _PRODUCT_KEY.fullmatch(product_key):
            raise BusinessFault("iot.prod.InvalidFormattedProductkey", "The ProductKey is malformed.")
        product = self._products.get(product_key)
        # A product of another instance does not exist for this call (doc 69482, IotInstanceId).
        if product is None or product.instance_id != (instance_id or None):
            raise BusinessFault("iot.prod.NotExistedProduct", "The product does not exist.")
        return product

    def _find_application(self, apply_id: str | int | None) -> _Application:
        if apply_id is None or apply_id == "":
            raise BusinessFault("iot.device.NullApplyId", "The ApplyId cannot be empty.")
        number = _parse_int(apply_id)
        if number is None or number < 1:
            raise BusinessFault("iot.device.InvalidFormattedApplyId", "The ApplyId is malformed.")
        app = self._applications.get(number)
        if app is None:
            raise BusinessFault("iot.device.DeviceApplyIsNotFound", "The ApplyId is not found.")
        return app

    def _application_of(self, product: _Product, apply_id: str | int | None) -> _Application:
        app = self._find_application(apply_id)
        # Another product's application is not found under this one: no code says otherwise.
        if app.product_key != product.key:
            raise BusinessFault("iot.device.DeviceApplyIsNotFound", "The ApplyId is not found.")
        return app

    def _new_application(
        self,
        product: _Product,
        entries: list[tuple[str, str | None]],
        status: Status,
        seconds: float,
        *,
        generated: bool = False,
    ) -> _Application:
        apply_id = self._next_apply_id
        self._next_apply_id += 1
        app = _Application(
            apply_id, product.key, entries, status, self._clock.monotonic() + seconds, generated
        )
        self._applications[apply_id] = app
        heapq.heappush(self._deadlines, (app.deadline, apply_id))
        return app

    def _start_create(self, app: _Application) -> None:
        app.status = Status.CREATE
        app.failures = {}
        app.deadline = self._clock.monotonic() + self.create_seconds
        heapq.heappush(self._deadlines, (app.deadline, app.apply_id))

    def _precheck(self, entries: list[tuple[str, str | None]]) -> None:
        """Refuse at once a list with malformed or repeated names or malformed nicknames."""
        reasons = _syntax_reasons(entries)
        if not reasons:
            return
        seen = [name for name, _ in entries]
        bad_names = _unique(n for n in seen if MSG_INVALID_NAME in reasons.get(n, ()))
        repeated = _unique(n for n in seen if MSG_REPEATED_NAME in reasons.get(n, ()))
        bad_nicks = _unique(nick for name, nick in entries if nick and not is_valid_nickname(nick))
        nick_of = dict(reversed(entries))
        details = []
        for name in _unique(seen):
            if name in reasons:
                detail = {"DeviceName": name}
                if nick_of.get(name):
                    detail["NickName"] = nick_of[name]
                detail["ErrorMsg"] = "|".join(reasons[name])
                details.append(detail)
        data = {
            "InvalidDeviceNameList": {"InvalidDeviceName": bad_names},
            "InvalidDeviceNicknameList": {"InvalidDeviceNickname": bad_nicks},
            "RepeatedDeviceNameList": {"RepeatDevieNameList": repeated},  # "Devie": the wire's spelling
            "InvalidDetailList": {"InvalidDetailList": details},
        }
        # No code is documented for a bad nickname or a repeated name; the closest device codes.
        if bad_names or bad_nicks:
            raise BusinessFault(
                "iot.device.InvalidFormattedDeviceName", "Some device names or nicknames are malformed.", data
            )
        raise BusinessFault(
            "iot.device.AlreadyExistedDeviceName", "Some device names are repeated in the list.", data
        )

    def _settle(self) -> None:
        """Finish every phase whose deadline has passed, oldest deadline first."""
        now = self._clock.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now + 1e-9:
            deadline, apply_id = heapq.heappop(self._deadlines)
            app = self._applications[apply_id]
            if app.deadline != deadline:
                continue  # a stale entry
            if app.status is Status.CHECK:
                self._finish_check(app)
            elif app.status is Status.CREATE:
                self._finish_create(app)

    def _finish_check(self, app: _Application) -> None:
        product = self._products[app.product_key]
        reasons = {} if self.precheck else _syntax_reasons(app.entries)
        used_nicks = set(product.nicknames)
        for name, nick in app.entries:
            found = reasons.setdefault(name, [])
            if name in product.devices and MSG_NAME_EXISTS not in found:
                found.append(MSG_NAME_EXISTS)
            if nick and nick in used_nicks and MSG_NICKNAME_EXISTS not in found:
                found.append(MSG_NICKNAME_EXISTS)
            if nick:
                used_nicks.add(nick)
        app.failures = {name: found for name, found in reasons.items() if found}
        app.status = Status.CHECK_FAILED if app.failures else Status.CHECK_SUCCESS

    def _finish_create(self, app: _Application) -> None:
        product = self._products[app.product_key]
        for name, nick in app.entries:
            if name in product.devices:  # created by another application since the check
                app.failures[name] = [MSG_NAME_EXISTS]
            elif nick and nick in product.nicknames:
                app.failures[name] = [MSG_NICKNAME_EXISTS]
            elif self._failures.random() < self.create_failure_rate:
                app.failures[name] = [MSG_CREATE_FAILED]
            else:
                self._create_device(product, name, nick, apply_id=app.apply_id)
                app.created.append(name)
        app.status = Status.CREATE_FAILED if app.failures else Status.CREATE_SUCCESS

    def _create_device(
        self, product: _Product, name: str, nickname: str | None, *, apply_id: int | None
    ) -> Device:
        device = Device(
            product_key=product.key,
            device_name=name,
            nickname=nickname,
            # IotId: 20 random characters and a numeric tail, the shape of real ones.
            iot_id="".join(self._ids.choices(_ALNUM, k=20)) + "000100",
            device_secret="".join(self._ids.choices(_ALNUM, k=32)),
            device_id="".join(self._ids.choices(_ALNUM, k=20)),
            apply_id=apply_id,
        )
        product.devices[name] = device
        if nickname:
            product.nicknames.add(nickname)
        return device


def _syntax_reasons(entries: Sequence[tuple[str, str | None]]) -> dict[str, list[str]]:
    """Reasons found in the list alone: malformed names and nicknames, names given twice."""
    counts: dict[str, int] = {}
    for name, _ in entries:
        counts[name] = counts.get(name, 0) + 1
    reasons: dict[str, list[str]] = {}
    for name, nick in entries:
        found = reasons.setdefault(name, [])
        for bad, message in (
            (not is_valid_device_name(name), MSG_INVALID_NAME),
            (counts[name] > 1, MSG_REPEATED_NAME),
            (bool(nick) and not is_valid_nickname(nick or ""), MSG_INVALID_NICKNAME),
        ):
            if bad and message not in found:
                found.append(message)
    return {name: found for name, found in reasons.items() if found}


def _parse_int(value: str | int | None) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d{1,18}", value.strip()):
        return int(value)
    return None


def _unique(items: Iterable[str]) -> list[str]:
    """The items without repeats, in first-seen order."""
    return list(dict.fromkeys(items))
