"""Settings: defaults, parsing, and errors that name the variable to fix."""

import dataclasses

import pytest

from bot.config import DEFAULT_QPS, ConfigError, Settings


def test_defaults_follow_the_platform():
    s = Settings.from_env({})
    assert s.region_id == "cn-shanghai"
    assert s.endpoint == "https://iot.cn-shanghai.aliyuncs.com"
    assert s.instance_id is None
    assert dict(s.qps) == {
        "BatchCheckDeviceNames": 10,
        "BatchRegisterDeviceWithApplyId": 500,
        "BatchRegisterDevice": 10,
        "QueryBatchRegisterDeviceStatus": 30,
        "QueryPageByApplyId": 50,
        "QueryProductList": 50,
    }


def test_region_sets_the_default_endpoint_and_an_explicit_endpoint_wins():
    assert Settings.from_env({"IOT_REGION_ID": "ap-southeast-1"}).endpoint == "https://iot.ap-southeast-1.aliyuncs.com"
    s = Settings.from_env({"IOT_REGION_ID": "eu-central-1", "IOT_ENDPOINT": "http://127.0.0.1:8700/"})
    assert s.endpoint == "http://127.0.0.1:8700"


def test_settings_are_frozen_and_hide_the_secret():
    s = Settings.from_env({"ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAIexample", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "hunter2-secret"})
    assert "hunter2-secret" not in repr(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.region_id = "us-west-1"  # type: ignore[misc]


def test_a_chunk_over_the_platforms_limit_is_refused_naming_the_limit():
    assert Settings.from_env({"IOTREG_CHUNK_SIZE": "10000"}).chunk_size == 10_000
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"IOTREG_CHUNK_SIZE": "10001"})
    assert str(caught.value) == "IOTREG_CHUNK_SIZE: 10001 is above IoT Platform's limit of 10,000 names per check"


def test_the_signature_is_v1_unless_v3_is_asked_for():
    assert Settings.from_env({}).signature == "v1"
    assert Settings.from_env({"IOT_SIGNATURE": "V3"}).signature == "v3"


def test_a_security_token_is_hidden_like_the_secret():
    s = Settings.from_env(
        {"ALIBABA_CLOUD_ACCESS_KEY_ID": "STS.example", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "s", "ALIBABA_CLOUD_SECURITY_TOKEN": "CAIS-token"}
    )
    assert s.security_token == "CAIS-token" and "CAIS-token" not in repr(s)


def test_qps_overrides_one_action_and_keeps_the_rest():
    s = Settings.from_env({"IOT_QPS": "BatchCheckDeviceNames=2, QueryPageByApplyId=0.5"})
    assert s.qps["BatchCheckDeviceNames"] == 2
    assert s.qps["QueryPageByApplyId"] == 0.5
    assert s.qps["QueryBatchRegisterDeviceStatus"] == DEFAULT_QPS["QueryBatchRegisterDeviceStatus"]


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"IOT_REGION_ID": "Shanghai"}, "IOT_REGION_ID"),
        ({"IOT_ENDPOINT": "iot.cn-shanghai.aliyuncs.com"}, "IOT_ENDPOINT"),
        ({"IOT_TIMEOUT": "ten"}, "IOT_TIMEOUT"),
        ({"IOT_TIMEOUT": "0"}, "IOT_TIMEOUT"),
        ({"IOT_MAX_ATTEMPTS": "2.5"}, "IOT_MAX_ATTEMPTS"),
        ({"IOT_QPS": "CreateProduct=5"}, "IOT_QPS"),
        ({"IOT_QPS": "BatchCheckDeviceNames=0"}, "IOT_QPS"),
        ({"IOT_QPS": "BatchCheckDeviceNames"}, "IOT_QPS"),
        ({"IOT_SIGNATURE": "hmac-sha1"}, "IOT_SIGNATURE"),
        ({"IOTREG_CHUNK_SIZE": "0"}, "IOTREG_CHUNK_SIZE"),
        ({"IOTREG_REMINDERS": "1h,soon"}, "IOTREG_REMINDERS"),
        ({"IOTREG_REMINDERS": "4h,1h"}, "IOTREG_REMINDERS"),
    ],
)
def test_malformed_values_name_their_variable(environ, named):
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(environ)


def test_reminders_are_durations_from_the_earliest():
    assert Settings.from_env({"IOTREG_REMINDERS": "30m, 1h,4h"}).reminders == (1800.0, 3600.0, 14400.0)
    assert Settings.from_env({}).reminders == ()


def test_require_names_every_missing_variable():
    s = Settings.from_env({"ALIBABA_CLOUD_ACCESS_KEY_ID": "id"})
    with pytest.raises(ConfigError) as info:
        s.require("access_key_id", "access_key_secret")
    assert "ALIBABA_CLOUD_ACCESS_KEY_SECRET" in str(info.value)
    assert "ALIBABA_CLOUD_ACCESS_KEY_ID" not in str(info.value)


def test_env_file_is_read_and_the_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# iotreg settings\n"
        "export IOT_REGION_ID=us-west-1\n"
        "ALIBABA_CLOUD_ACCESS_KEY_ID='from-file'\n"
        'IOT_INSTANCE_ID="iot-cn-0pp1n8t"  \n'
        "IOT_TIMEOUT=5 # seconds\n",
        encoding="utf-8",
    )
    s = Settings.load({"ALIBABA_CLOUD_ACCESS_KEY_ID": "from-env"}, env_file)
    assert (s.region_id, s.access_key_id, s.instance_id, s.timeout) == ("us-west-1", "from-env", "iot-cn-0pp1n8t", 5.0)


def test_a_broken_env_file_line_is_reported_with_its_number(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("IOT_REGION_ID=cn-shanghai\nthis is not a setting\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\.env:2"):
        Settings.load({}, env_file)


def test_missing_env_file_is_fine(tmp_path):
    assert Settings.load({}, tmp_path / "absent.env").region_id == "cn-shanghai"


def test_the_database_is_a_file_by_default_or_a_postgres_url():
    assert Settings.from_env({}).db_path == "iotreg.db"
    assert Settings.from_env({"IOTREG_DB": "/data/iotreg.db"}).db_path == "/data/iotreg.db"
    url = "postgresql://iotreg:pw@db.internal:5432/iotreg"
    assert Settings.from_env({"IOTREG_DB": url}).db_path == url


def test_database_url_is_used_when_iotreg_db_is_unset_and_iotreg_db_wins():
    url = "postgres://iotreg:pw@db.internal/iotreg"
    assert Settings.from_env({"DATABASE_URL": url}).db_path == url
    assert Settings.from_env({"DATABASE_URL": url, "IOTREG_DB": "/data/iotreg.db"}).db_path == "/data/iotreg.db"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"IOTREG_DB": "mysql://iotreg:hunter2-pw@db/iotreg"}, "IOTREG_DB"),
        ({"IOTREG_DB": "postgresql://iotreg:hunter2-pw@db:fivefour/iotreg"}, "IOTREG_DB"),
        ({"DATABASE_URL": "/data/iotreg.db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite://hunter2-pw"}, "DATABASE_URL"),
    ],
)
def test_a_malformed_database_setting_is_named_without_its_password(environ, named):
    with pytest.raises(ConfigError, match=named) as caught:
        Settings.from_env(environ)
    assert "hunter2-pw" not in str(caught.value)


def test_a_database_password_is_in_no_repr_and_the_location_hides_it():
    s = Settings.from_env({"IOTREG_DB": "postgresql://iotreg:hunter2-pw@db.internal/iotreg"})
    assert "hunter2-pw" not in repr(s)
    assert s.db_location == "postgresql://iotreg:***@db.internal/iotreg"
    assert Settings.from_env({"IOTREG_DB": "/data/iotreg.db"}).db_location == "/data/iotreg.db"


def test_the_log_format_is_text_or_json():
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"IOTREG_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match="IOTREG_LOG_FORMAT"):
        Settings.from_env({"IOTREG_LOG_FORMAT": "xml"})


def test_a_quoted_value_followed_by_a_comment_loses_its_quotes(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text('IOT_INSTANCE_ID="iot-cn-0pp1n8t"   # the Overview page\nIOTREG_APPROVERS=\'U0BOB\'  # Bob\n', encoding="utf-8")
    s = Settings.load({}, env_file)
    assert (s.instance_id, s.approvers) == ("iot-cn-0pp1n8t", ("U0BOB",))


def test_the_database_and_the_env_file_live_in_iotregs_home_whatever_the_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".env").write_text("IOT_REGION_ID=eu-central-1\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = Settings.load({"IOTREG_HOME": str(home)})
    assert (s.db_path, s.region_id) == (str(home / "iotreg.db"), "eu-central-1")
    assert Settings.from_env({"HOME": str(tmp_path)}).db_path == str(tmp_path / ".local/share/iotreg/iotreg.db")


def test_an_iotreg_db_left_in_the_working_folder_is_still_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "iotreg.db").write_bytes(b"")
    assert Settings.from_env({"HOME": str(tmp_path / "h")}).db_path == "iotreg.db"
    assert Settings.from_env({"IOTREG_DB": "/data/x.db", "HOME": "/h"}).db_path == "/data/x.db"
