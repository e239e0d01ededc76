"""The emulator's state machine: statuses on the clock, every refusal, paging, failures, generated names."""

from __future__ import annotations

import re

import pytest

from bot.clock import ManualClock
from bot.standins.emulator.backend import (
    FIRST_APPLY_ID,
    MSG_CREATE_FAILED,
    MSG_INVALID_NAME,
    MSG_INVALID_NICKNAME,
    MSG_NAME_EXISTS,
    MSG_NICKNAME_EXISTS,
    MSG_REPEATED_NAME,
    BusinessFault,
    IotBackend,
    Status,
    is_valid_device_name,
    is_valid_nickname,
)

PK = "a1TestProd1"
OTHER_PK = "a1OtherProd"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def backend(clock: ManualClock) -> IotBackend:
    backend = IotBackend(clock, check_seconds=2.0, create_seconds=3.0, seed=7)
    backend.add_product(PK)
    backend.add_product(OTHER_PK)
    return backend


def names(*items: str) -> list[tuple[str, str | None]]:
    return [(item, None) for item in items]


def check(backend: IotBackend, entries: list[tuple[str, str | None]], product_key: str = PK) -> int:
    return int(backend.batch_check_device_names(product_key, entries)["ApplyId"])  # type: ignore[arg-type]


def status(backend: IotBackend, apply_id: int, product_key: str = PK) -> dict:
    return backend.query_batch_register_device_status(product_key, str(apply_id))


def fault(call, *args, **kwargs) -> BusinessFault:
    with pytest.raises(BusinessFault) as caught:
        call(*args, **kwargs)
    return caught.value


def test_the_whole_flow_moves_with_the_clock(backend: IotBackend, clock: ManualClock) -> None:
    apply_id = check(backend, [("lamp-0001", "门厅灯"), ("lamp-0002", None)])
    assert apply_id == FIRST_APPLY_ID
    assert status(backend, apply_id)["Status"] == "CHECK"
    clock.advance(1.999)
    assert status(backend, apply_id)["Status"] == "CHECK"
    clock.advance(0.001)
    checked = status(backend, apply_id)
    assert checked == {
        "Status": "CHECK_SUCCESS",
        "ValidList": {"Name": []},
        "InvalidList": {"Name": []},
        "InvalidDetailList": {"invalidDetailList": []},
    }
    assert backend.devices(PK) == []

    assert backend.batch_register_device_with_apply_id(PK, str(apply_id)) == {"ApplyId": apply_id}
    assert status(backend, apply_id)["Status"] == "CREATE"
    assert backend.query_page_by_apply_id(apply_id)["Total"] == 0  # nothing created yet
    clock.advance(3.0)
    assert status(backend, apply_id)["Status"] == "CREATE_SUCCESS"
    assert status(backend, apply_id)["InvalidList"] == {"Name": []}

    devices = {device.device_name: device for device in backend.devices(PK)}
    assert set(devices) == {"lamp-0001", "lamp-0002"}
    assert devices["lamp-0001"].nickname == "门厅灯"
    for device in devices.values():
        assert re.fullmatch(r"[A-Za-z0-9]{32}", device.device_secret)
        assert re.fullmatch(r"[A-Za-z0-9]{20,32}", device.iot_id)
        assert device.apply_id == apply_id
    page = backend.query_page_by_apply_id(str(apply_id))
    assert page["Total"] == 2
    listed = page["ApplyDeviceList"]["ApplyDeviceInfo"]
    assert [info["DeviceName"] for info in listed] == ["lamp-0001", "lamp-0002"]
    assert listed[0] == {
        "DeviceId": devices["lamp-0001"].device_id,
        "DeviceName": "lamp-0001",
        "DeviceSecret": devices["lamp-0001"].device_secret,
        "IotId": devices["lamp-0001"].iot_id,
    }


def test_apply_ids_increase(backend: IotBackend) -> None:
    first = check(backend, names("abcd"))
    second = check(backend, names("abce"))
    third = int(backend.batch_register_device(PK, "1")["ApplyId"])  # type: ignore[arg-type]
    assert FIRST_APPLY_ID == first < second < third
    assert backend.applications() == [first, second, third]


def test_a_zero_check_time_finishes_on_the_next_look(clock: ManualClock) -> None:
    backend = IotBackend(clock, check_seconds=0, create_seconds=0)
    backend.add_product(PK)
    apply_id = check(backend, names("abcd"))
    assert status(backend, apply_id)["Status"] == "CHECK_SUCCESS"
    backend.batch_register_device_with_apply_id(PK, apply_id)
    assert status(backend, apply_id)["Status"] == "CREATE_SUCCESS"


# ------------------------------------------------------------------------------------ the check


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("abcd", True),
        ("a" * 32, True),
        ("A-b_c@d.e:f9", True),
        ("abc", False),
        ("a" * 33, False),
        ("dev 01", False),
        ("dev/01", False),
        ("dev*01", False),
        ("设备0001", False),
    ],
)
def test_device_name_rule(name: str, valid: bool) -> None:
    assert is_valid_device_name(name) is valid


@pytest.mark.parametrize(
    ("nickname", "valid"),
    [
        ("ab_1", True),
        ("智能灯1", True),  # 2+2+2+1
        ("灯1", False),  # 3 units
        ("灯灯", True),  # 4 units
        ("あいう", True),  # kana count 2
        ("テスト", True),
        ("灯" * 32, True),  # 64 units
        ("灯" * 32 + "a", False),  # 65 units
        ("a" * 65, False),
        ("bad nick", False),
        ("ab-c", False),
        ("café", False),  # letters are A-Z and a-z only
    ],
)
def test_nickname_rule(nickname: str, valid: bool) -> None:
    assert is_valid_nickname(nickname) is valid


def test_a_name_that_exists_fails_the_check_and_the_rest_is_listed_valid(
    backend: IotBackend, clock: ManualClock
) -> None:
    backend.add_device(PK, "taken-01")
    apply_id = check(backend, [("fresh-01", None), ("taken-01", "门厅灯"), ("fresh-02", None)])
    clock.advance(2)
    assert status(backend, apply_id) == {
        "Status": "CHECK_FAILED",
        "ValidList": {"Name": ["fresh-01", "fresh-02"]},
        "InvalidList": {"Name": ["taken-01"]},
        "InvalidDetailList": {
            "invalidDetailList": [
                {"DeviceName": "taken-01", "NickName": "门厅灯", "ErrorMsg": MSG_NAME_EXISTS}
            ]
        },
    }
    assert backend.application(apply_id).failures == {"taken-01": (MSG_NAME_EXISTS,)}


def test_the_same_name_in_another_product_is_no_clash(backend: IotBackend, clock: ManualClock) -> None:
    backend.add_device(OTHER_PK, "shared-01")
    apply_id = check(backend, names("shared-01"))
    clock.advance(2)
    assert status(backend, apply_id)["Status"] == "CHECK_SUCCESS"


def test_nicknames_must_be_unique_in_the_product(backend: IotBackend, clock: ManualClock) -> None:
    backend.add_device(PK, "old-device", nickname="门厅灯")
    apply_id = check(backend, [("dev-0001", "门厅灯"), ("dev-0002", "走廊灯"), ("dev-0003", "走廊灯")])
    clock.advance(2)
    result = status(backend, apply_id)
    assert result["Status"] == "CHECK_FAILED"
    assert result["InvalidList"] == {"Name": ["dev-0001", "dev-0003"]}
    assert result["ValidList"] == {"Name": ["dev-0002"]}
    messages = {d["DeviceName"]: d["ErrorMsg"] for d in result["InvalidDetailList"]["invalidDetailList"]}
    assert messages == {"dev-0001": MSG_NICKNAME_EXISTS, "dev-0003": MSG_NICKNAME_EXISTS}


def test_malformed_and_repeated_names_are_refused_at_once_with_the_lists(backend: IotBackend) -> None:
    refused = fault(
        backend.batch_check_device_names,
        PK,
        [
            ("ok-name-1", "好名字"),
            ("bad name", None),
            ("dup-0001", None),
            ("dup-0001", None),
            ("ok-name-2", "bad nick"),
        ],
    )
    assert refused.code == "iot.device.InvalidFormattedDeviceName"
    assert refused.data == {
        "InvalidDeviceNameList": {"InvalidDeviceName": ["bad name"]},
        "InvalidDeviceNicknameList": {"InvalidDeviceNickname": ["bad nick"]},
        "RepeatedDeviceNameList": {"RepeatDevieNameList": ["dup-0001"]},
        "InvalidDetailList": {
            "InvalidDetailList": [
                {"DeviceName": "bad name", "ErrorMsg": MSG_INVALID_NAME},
                {"DeviceName": "dup-0001", "ErrorMsg": MSG_REPEATED_NAME},
                {"DeviceName": "ok-name-2", "NickName": "bad nick", "ErrorMsg": MSG_INVALID_NICKNAME},
            ]
        },
    }
    assert backend.applications() == []  # no ApplyId was handed out


def test_repeated_names_alone_get_the_already_existed_code(backend: IotBackend) -> None:
    refused = fault(backend.batch_check_device_names, PK, names("dup-0001", "dup-0001", "other-01"))
    assert refused.code == "iot.device.AlreadyExistedDeviceName"
    assert refused.data["RepeatedDeviceNameList"] == {"RepeatDevieNameList": ["dup-0001"]}


def test_without_precheck_every_defect_shows_in_the_status(clock: ManualClock) -> None:
    backend = IotBackend(clock, check_seconds=2, precheck=False)
    backend.add_product(PK)
    backend.add_device(PK, "taken-01")
    apply_id = check(
        backend,
        [
            ("good-0001", None),
            ("bad name", "bad nick"),
            ("taken-01", None),
            ("taken-01", None),
            ("good-0002", "好"),
        ],
    )
    assert status(backend, apply_id)["Status"] == "CHECK"
    clock.advance(2)
    result = status(backend, apply_id)
    assert result["Status"] == "CHECK_FAILED"
    assert result["ValidList"] == {"Name": ["good-0001"]}
    assert result["InvalidList"] == {"Name": ["bad name", "taken-01", "good-0002"]}
    messages = {d["DeviceName"]: d["ErrorMsg"] for d in result["InvalidDetailList"]["invalidDetailList"]}
    assert messages == {
        "bad name": f"{MSG_INVALID_NAME}|{MSG_INVALID_NICKNAME}",
        "taken-01": f"{MSG_REPEATED_NAME}|{MSG_NAME_EXISTS}",
        "good-0002": MSG_INVALID_NICKNAME,
    }


def test_more_than_ten_thousand_names_in_one_check_are_refused(backend: IotBackend, clock: ManualClock) -> None:
    refused = fault(backend.batch_check_device_names, PK, names(*(f"dev-{i:05d}" for i in range(10_001))))
    assert refused.code == "iot.device.DeviceCountExceeded" and "10000" in refused.message
    assert backend.applications() == []
    apply_id = check(backend, names(*(f"dev-{i:05d}" for i in range(10_000))))
    assert len(backend.application(apply_id).names) == 10_000
    clock.advance(2)
    assert status(backend, apply_id)["Status"] == "CHECK_SUCCESS"


def test_apply_ids_differ_across_restarts_unless_seeded(clock: ManualClock) -> None:
    def first_apply_id(**options: object) -> int:
        backend = IotBackend(clock, **options)  # type: ignore[arg-type]
        backend.add_product(PK)
        return check(backend, names("dev-0001"))

    before_restart = first_apply_id()
    clock.advance(0.001)
    after_restart = first_apply_id()
    assert FIRST_APPLY_ID < before_restart < after_restart
    assert first_apply_id(seed=5) == first_apply_id(seed=5) == FIRST_APPLY_ID


@pytest.mark.parametrize(
    ("product_key", "code"),
    [
        (None, "iot.prod.NullProductKey"),
        ("", "iot.prod.NullProductKey"),
        ("bad key!", "iot.prod.InvalidFormattedProductkey"),
        ("a" * 33, "iot.prod.InvalidFormattedProductkey"),
        ("a1NoSuchPrd", "iot.prod.NotExistedProduct"),
    ],
)
def test_product_key_refusals(backend: IotBackend, product_key: str | None, code: str) -> None:
    assert fault(backend.batch_check_device_names, product_key, names("abcd")).code == code
    assert fault(backend.batch_register_device, product_key, "1").code == code
    assert fault(backend.query_batch_register_device_status, product_key, FIRST_APPLY_ID).code == code
    assert fault(backend.batch_register_device_with_apply_id, product_key, FIRST_APPLY_ID).code == code


def test_a_product_of_an_instance_needs_its_instance_id(backend: IotBackend) -> None:
    backend.add_product("a1InstProd1", instance_id="iot-cn-abc123")
    assert (
        fault(backend.batch_check_device_names, "a1InstProd1", names("abcd")).code
        == "iot.prod.NotExistedProduct"
    )
    wrong = fault(
        backend.batch_check_device_names, "a1InstProd1", names("abcd"), iot_instance_id="iot-cn-other"
    )
    assert wrong.code == "iot.prod.NotExistedProduct"
    apply_id = backend.batch_check_device_names(
        "a1InstProd1", names("abcd"), iot_instance_id="iot-cn-abc123"
    )["ApplyId"]
    # ... and a product without an instance is not found when one is named.
    assert fault(
        backend.batch_check_device_names, PK, names("abcd"), iot_instance_id="iot-cn-abc123"
    ).code == ("iot.prod.NotExistedProduct")
    assert fault(backend.query_page_by_apply_id, apply_id).code == "iot.device.DeviceApplyIsNotFound"
    assert backend.query_page_by_apply_id(apply_id, iot_instance_id="iot-cn-abc123")["Total"] == 0


def test_an_empty_list_and_empty_names_are_refused(backend: IotBackend) -> None:
    assert fault(backend.batch_check_device_names, PK, []).code == "iot.device.NoneDeviceNameElement"
    assert (
        fault(backend.batch_check_device_names, PK, [("abcd", None), ("", None)]).code
        == "iot.device.NullDeviceName"
    )
    assert fault(backend.batch_check_device_names, PK, [(None, "好名字")]).code == "iot.device.NullDeviceName"


# ------------------------------------------------------------------------------------ register


def test_register_refusals_by_status_and_the_count_of_calls(backend: IotBackend, clock: ManualClock) -> None:
    register = backend.batch_register_device_with_apply_id
    apply_id = check(backend, names("abcd"))
    assert fault(register, PK, apply_id).code == "iot.device.CreateDeviceTaskIsRunning"  # CHECK
    clock.advance(2)
    register(PK, apply_id)
    assert fault(register, PK, apply_id).code == "iot.device.CreateDeviceTaskIsRunning"  # CREATE
    clock.advance(3)
    assert fault(register, PK, apply_id).code == "iot.device.ApplyManyDevicesFailed"  # CREATE_SUCCESS
    assert backend.application(apply_id).register_calls == 4
    assert len(backend.devices(PK)) == 1  # created once

    backend.add_device(PK, "taken-01")
    failed = check(backend, names("taken-01"))
    clock.advance(2)
    assert fault(register, PK, failed).code == "iot.device.ApplyManyDevicesFailed"  # CHECK_FAILED
    assert backend.application(failed).status is Status.CHECK_FAILED


@pytest.mark.parametrize(
    ("apply_id", "code"),
    [
        (None, "iot.device.NullApplyId"),
        ("", "iot.device.NullApplyId"),
        ("abc", "iot.device.InvalidFormattedApplyId"),
        ("12.5", "iot.device.InvalidFormattedApplyId"),
        ("0", "iot.device.InvalidFormattedApplyId"),
        ("-1295006", "iot.device.InvalidFormattedApplyId"),
        ("999", "iot.device.DeviceApplyIsNotFound"),
    ],
)
def test_apply_id_refusals(backend: IotBackend, apply_id: str | None, code: str) -> None:
    check(backend, names("abcd"))
    assert fault(backend.batch_register_device_with_apply_id, PK, apply_id).code == code
    assert fault(backend.query_batch_register_device_status, PK, apply_id).code == code
    assert fault(backend.query_page_by_apply_id, apply_id).code == code


def test_another_products_apply_id_is_not_found(backend: IotBackend, clock: ManualClock) -> None:
    apply_id = check(backend, names("abcd"))
    clock.advance(2)
    assert (
        fault(backend.batch_register_device_with_apply_id, OTHER_PK, apply_id).code
        == "iot.device.DeviceApplyIsNotFound"
    )
    assert (
        fault(backend.query_batch_register_device_status, OTHER_PK, apply_id).code
        == "iot.device.DeviceApplyIsNotFound"
    )
    assert backend.application(apply_id).status is Status.CHECK_SUCCESS


def test_two_applications_for_one_name_only_the_first_creates_it(
    backend: IotBackend, clock: ManualClock
) -> None:
    first = check(backend, names("lamp-0001", "lamp-0002"))
    second = check(backend, names("lamp-0001", "lamp-0003"))
    clock.advance(2)
    assert status(backend, first)["Status"] == status(backend, second)["Status"] == "CHECK_SUCCESS"
    backend.batch_register_device_with_apply_id(PK, first)
    clock.advance(1)
    backend.batch_register_device_with_apply_id(PK, second)
    clock.advance(3)  # both deadlines pass between two looks: settled in deadline order
    assert status(backend, first)["Status"] == "CREATE_SUCCESS"
    result = status(backend, second)
    assert result["Status"] == "CREATE_FAILED"
    assert result["ValidList"] == {"Name": ["lamp-0003"]}
    assert result["InvalidList"] == {"Name": ["lamp-0001"]}
    assert result["InvalidDetailList"]["invalidDetailList"][0]["ErrorMsg"] == MSG_NAME_EXISTS
    assert backend.devices(PK)[0].apply_id == first
    assert [
        i["DeviceName"] for i in backend.query_page_by_apply_id(second)["ApplyDeviceList"]["ApplyDeviceInfo"]
    ] == ["lamp-0003"]


def test_a_name_created_while_another_check_runs_fails_that_check(
    backend: IotBackend, clock: ManualClock
) -> None:
    early = check(backend, names("lamp-0001"))
    clock.advance(2)
    backend.batch_register_device_with_apply_id(PK, early)  # creation ends at t=5
    clock.advance(2)
    late = check(backend, names("lamp-0001"))  # its check ends at t=6
    clock.advance(2)  # one look after both deadlines
    assert status(backend, late)["Status"] == "CHECK_FAILED"
    assert status(backend, early)["Status"] == "CREATE_SUCCESS"


def test_a_share_of_creations_fails_deterministically(clock: ManualClock) -> None:
    def run(seed: int) -> tuple[dict, list[str]]:
        backend = IotBackend(clock, check_seconds=0, create_seconds=0, create_failure_rate=0.3, seed=seed)
        backend.add_product(PK)
        apply_id = check(backend, names(*(f"dev-{i:04d}" for i in range(1000))))
        backend.batch_register_device_with_apply_id(PK, apply_id)
        return status(backend, apply_id), [d.device_name for d in backend.devices(PK)]

    result, created = run(seed=1)
    assert result["Status"] == "CREATE_FAILED"
    failed = result["InvalidList"]["Name"]
    assert 240 <= len(failed) <= 360
    assert result["ValidList"]["Name"] == created
    assert len(created) + len(failed) == 1000
    assert {d["ErrorMsg"] for d in result["InvalidDetailList"]["invalidDetailList"]} == {MSG_CREATE_FAILED}
    assert run(seed=1)[1] == created
    assert run(seed=2)[1] != created


def test_a_failure_rate_of_one_creates_nothing(clock: ManualClock) -> None:
    backend = IotBackend(clock, check_seconds=0, create_seconds=0, create_failure_rate=1.0)
    backend.add_product(PK)
    apply_id = check(backend, names("abcd", "abce"))
    backend.batch_register_device_with_apply_id(PK, apply_id)
    assert status(backend, apply_id)["InvalidList"] == {"Name": ["abcd", "abce"]}
    assert backend.devices(PK) == []
    assert backend.query_page_by_apply_id(apply_id)["Total"] == 0


# --------------------------------------------------------------------- platform-generated names


def test_batch_register_device_generates_names_and_goes_straight_to_create(
    backend: IotBackend, clock: ManualClock
) -> None:
    apply_id = int(backend.batch_register_device(PK, "25")["ApplyId"])  # type: ignore[arg-type]
    assert status(backend, apply_id)["Status"] == "CREATE"
    clock.advance(3)
    assert status(backend, apply_id)["Status"] == "CREATE_SUCCESS"
    created = backend.devices(PK)
    assert len(created) == 25
    assert len({device.device_name for device in created}) == 25
    assert all(re.fullmatch(r"[A-Za-z0-9]{20}", device.device_name) for device in created)
    assert backend.application(apply_id).generated
    assert backend.query_page_by_apply_id(apply_id)["Total"] == 25


@pytest.mark.parametrize(
    ("count", "code"),
    [
        ("10001", "iot.device.DeviceCountExceeded"),
        ("0", "iot.common.InvalidFormattedParameter"),
        ("-3", "iot.common.InvalidFormattedParameter"),
        ("many", "iot.common.InvalidFormattedParameter"),
        ("", "iot.common.InvalidFormattedParameter"),
    ],
)
def test_batch_register_device_count_refusals(backend: IotBackend, count: str, code: str) -> None:
    assert fault(backend.batch_register_device, PK, count).code == code
    assert backend.applications() == []


def test_ten_thousand_is_the_largest_count(clock: ManualClock) -> None:
    backend = IotBackend(clock, create_seconds=0)
    backend.add_product(PK)
    apply_id = backend.batch_register_device(PK, 10_000)["ApplyId"]
    assert backend.query_page_by_apply_id(apply_id, page_size=50)["Total"] == 10_000


# ------------------------------------------------------------------------------------- paging


def test_paging(backend: IotBackend, clock: ManualClock) -> None:
    wanted = [f"dev-{i:04d}" for i in range(23)]
    apply_id = check(backend, names(*wanted))
    clock.advance(2)
    backend.batch_register_device_with_apply_id(PK, apply_id)
    clock.advance(3)

    first = backend.query_page_by_apply_id(apply_id)
    assert {k: first[k] for k in ("Page", "PageSize", "PageCount", "Total")} == {
        "Page": 1,
        "PageSize": 10,
        "PageCount": 3,
        "Total": 23,
    }
    seen = []
    for page in (1, 2, 3):
        result = backend.query_page_by_apply_id(str(apply_id), current_page=str(page), page_size="10")
        seen += [info["DeviceName"] for info in result["ApplyDeviceList"]["ApplyDeviceInfo"]]
    assert seen == wanted
    beyond = backend.query_page_by_apply_id(apply_id, current_page=4, page_size=10)
    assert beyond["ApplyDeviceList"]["ApplyDeviceInfo"] == [] and beyond["Page"] == 4
    assert backend.query_page_by_apply_id(apply_id, page_size=50)["PageCount"] == 1


@pytest.mark.parametrize(("page", "size"), [("0", "10"), ("1", "0"), ("1", "51"), ("x", "10"), ("1", "ten")])
def test_bad_page_parameters(backend: IotBackend, page: str, size: str) -> None:
    apply_id = check(backend, names("abcd"))
    refused = fault(backend.query_page_by_apply_id, apply_id, current_page=page, page_size=size)
    assert refused.code == "iot.common.InvalidPageParams"
