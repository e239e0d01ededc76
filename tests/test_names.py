"""Device lists: what operators upload or paste, read and checked the way the platform would.

The corpus under tests/data/names/ holds small files shaped like the real thing: Excel's exports,
a German semicolon CSV, Slack's sign-in page, a workbook, a photo. Every expectation is what the
operator would see: which names go ahead, which lines are refused and why, or why the whole file is.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import re
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bot.names import (
    Device,
    DeviceList,
    DeviceListError,
    Rejected,
    nickname_length,
    parse_pasted,
    read_device_file,
    validate_name,
    validate_nickname,
)

CORPUS = Path(__file__).parent / "data" / "names"
SAMPLE = Path(__file__).parent.parent / "bot" / "data" / "sample_devices.csv"

NAME_RULE = "use letters, digits and - _ @ . :"
NICK_RULE = "use Chinese or Japanese characters, letters, digits and _"


def read(name: str, **options: object) -> DeviceList:
    return read_device_file((CORPUS / name).read_bytes(), filename=name, **options)


def outcome(result: DeviceList) -> tuple[list[tuple[str, str | None]], list[tuple[int | None, str, str]]]:
    devices = [(d.name, d.nickname) for d in result.devices]
    rejected = [(r.line, r.value, r.reason) for r in result.rejected]
    return devices, rejected


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --- the corpus ----------------------------------------------------------------------------------

ACCEPTED = {
    "excel_unicode_text.txt": (
        "csv",
        7,
        [
            ("sensor-hz-0001", "一号车间温度"),
            ("sensor-hz-0002", "ライン2_湿度"),
            ("sensor-hz-0003", None),
            ("sensor-hz-0005", "温度"),
        ],
        [(5, "sensor hz 0004", f"a space is not allowed: {NAME_RULE}")],
    ),
    "excel_utf8_bom_crlf.csv": (
        "csv",
        10,
        [
            ("gw-sh-0001", "Gateway_1"),
            ("gw-sh-0002", "Gateway_2"),
            ("gw-sh-0003", None),
            ("gw:sh@0006", None),
        ],
        [
            (6, "=cmd|' /C calc'!A0", f"'=', '|', \"'\" and 3 more are not allowed: {NAME_RULE}"),
            (7, "gw-sh-0001", "duplicate of line 2"),
            (
                8,
                "gw-sh-0004",  # refused for its nickname, listed under its name
                "nickname too long: 72 (Chinese and Japanese characters count 2), at most 64",
            ),
            (9, "gw-sh-0005-with-a-name-that-is-too-long", "too long: 39 characters, at most 32"),
        ],
    ),
    "german_excel_semicolon.csv": (
        "csv",
        6,
        [("pumpe-01", "Pumpe_1"), ("pumpe-02", "Pumpe_2"), ("pumpe-05", "Pumpe_5")],
        [
            (4, "p03", "too short: 3 characters, at least 4"),
            (5, "pumpe-04", "nickname too short: 2 characters, at least 4"),
        ],
    ),
    "headerless_column.csv": (
        "text",
        6,
        [("meter-0001", None), ("meter-0002", None), ("meter-0003", None), ("meter-0005", None)],
        [(4, "meter 0004", f"a space is not allowed: {NAME_RULE}")],
    ),
    "names_with_comments.txt": (
        "text",
        11,
        [("cam-b-0001", None), ("cam-b-0002", None), ("cam-b-0003", None), ("cam-b-0004", None)],
        [
            (9, "cam#b#0005", f"'#' is not allowed: {NAME_RULE}"),
            (10, "cam-b-0002", "duplicate of line 4"),
            (11, "cam", "too short: 3 characters, at least 4"),
        ],
    ),
    "classic_mac_cr.txt": (
        "text",
        4,
        [("valve-0001", None), ("valve-0002", None), ("valve-0004", None)],
        [(3, "vlv", "too short: 3 characters, at least 4")],
    ),
    "nickname_first_extra_columns.csv": (
        "csv",
        6,
        [("press-a-0001", "Press_1"), ("press-a-0002", None), ("press-b-0003", "冲压机_3")],
        [
            (5, "press-b-0004", f"a space is not allowed in a nickname: {NICK_RULE}"),
            (6, "Line B,Press_5,SN-995,,spare", "no DeviceName on this line"),
        ],
    ),
    "utf16_be_names.txt": ("text", 2, [("tag-0001", None), ("tag-0002", None)], []),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_real_world_files_are_read_with_every_bad_line_explained(name):
    format, lines_read, devices, rejected = ACCEPTED[name]
    result = read(name)
    assert outcome(result) == (devices, rejected)
    assert result.format == format
    assert result.lines_read == lines_read
    assert result.rejected_count == len(rejected)
    assert result.duplicates == sum(r[2].startswith("duplicate") for r in rejected)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_how_the_bytes_arrive_does_not_matter(name):
    """One chunk, a byte at a time (splitting CRLF and UTF-16 characters), or a file object."""
    data = (CORPUS / name).read_bytes()
    whole = outcome(read_device_file(data))
    assert outcome(read_device_file(iter(chunked(data, 1)))) == whole
    assert outcome(read_device_file(iter(chunked(data, 7)))) == whole
    assert outcome(read_device_file(io.BytesIO(data))) == whole
    assert outcome(read_device_file(bytearray(data))) == whole


def test_large_files_read_the_same_in_any_chunks():
    rows = []
    for i in range(6000):  # about 150 KB: several chunks even in one piece
        rows.append(f"unit-{i:05d},车间_{i}" if i % 500 else ["", "bad#name,", "unit-00007,Again"][i // 500 % 3])
    data = ("DeviceName,DeviceNickname\r\n" + "\r\n".join(rows)).encode("utf-16")
    whole = outcome(read_device_file(data))
    assert len(whole[0]) == 5988 and len(whole[1]) == 8
    assert (1002, "unit-00007", "duplicate of line 9") in whole[1]
    for cut in (97, 4096, 65537):
        assert outcome(read_device_file(iter(chunked(data, cut)))) == whole


REFUSED = {
    "devices.xlsx": "devices.xlsx looks like an Excel workbook or a zip file: save it as CSV",
    "old_excel.xls": "old_excel.xls looks like an old Excel workbook (.xls): save it as CSV",
    "slack_sign_in.html": "slack_sign_in.html is an HTML page, not a device list",
    "empty.csv": "empty.csv is empty",
    "photo.png": "photo.png is a binary file, not a device list: upload a CSV or a text file",
    "only_comments.txt": "only_comments.txt has no device names, only comments",
    "header_only.csv": "header_only.csv has a header but no device names",
    "no_devicename_column.csv": (
        "no_devicename_column.csv has no DeviceName column (the first line has 'Name', 'Location', "
        "'Installed'): put the device names in a column titled \"DeviceName\" (and nicknames in "
        '"DeviceNickname"), or list one name a line'
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_files_that_are_not_device_lists_are_refused_with_what_to_do(name):
    with pytest.raises(DeviceListError) as refused:
        read(name)
    assert refused.value.message == REFUSED[name] == str(refused.value)


def test_without_a_filename_messages_say_this_file():
    with pytest.raises(DeviceListError, match="^this looks like an Excel workbook or a zip file: save it as CSV"):
        read_device_file((CORPUS / "devices.xlsx").read_bytes())
    with pytest.raises(DeviceListError, match="^this is an HTML page, not a device list$"):
        read_device_file((CORPUS / "slack_sign_in.html").read_bytes())
    with pytest.raises(DeviceListError, match="^this file is empty$"):
        read_device_file(b"")
    with pytest.raises(DeviceListError, match="^this file is empty$"):
        read_device_file(codecs.BOM_UTF8 + b"\r\n  \r\n")


def test_the_shipped_sample_shows_every_kind_of_local_rejection():
    result = read_device_file(SAMPLE.read_bytes(), filename="sample_devices.csv")
    assert result.format == "csv"
    assert result.lines_read == 301
    assert len(result.devices) == 292
    assert result.devices[0] == Device("sensor-hz-0001", "二号车间_湿度001")
    assert [(r.line, r.reason.split(":")[0]) for r in result.rejected] == [
        (38, "too short"),
        (82, "'#' is not allowed"),
        (123, "a space is not allowed"),
        (151, "duplicate of line 43"),
        (188, "nickname too long"),
        (234, "a space is not allowed in a nickname"),
        (262, "too long"),
        (289, "full-width characters are not allowed ('ｓ', 'ｅ', 'ｎ' and 2 more)"),
    ]


# --- encodings, line ends, shapes ------------------------------------------------------------------


def test_utf16_without_a_bom_is_still_read():
    data = "DeviceName\r\nrelay-0001\r\nrelay-0002\r\n".encode("utf-16-le")
    assert [d.name for d in read_device_file(data).devices] == ["relay-0001", "relay-0002"]
    data = "relay-0001\nrelay-0002\n".encode("utf-16-be")
    assert [d.name for d in read_device_file(data).devices] == ["relay-0001", "relay-0002"]


def test_a_bad_byte_is_reported_on_its_line_even_across_chunks():
    names = "".join(f"node-{i:05d}\n" for i in range(600)).encode()  # past the first 4 KB
    # 0x81 then a digit: not UTF-8, nor GB18030, nor Windows-1252 (where 0x81 is unassigned).
    data = b"DeviceName\n" + names + b"node-\x810003\nnode-0004\n"
    for size in (1, 2, 3, 5, 64 * 1024):
        with pytest.raises(DeviceListError, match="^line 602 of this file is not UTF-8 text"):
            read_device_file(iter(chunked(data, size)))
    # A file cut in the middle of a character.
    with pytest.raises(DeviceListError, match="^line 2 of this file is not UTF-8 text"):
        read_device_file("node-0001\nnode-温".encode()[:-1])


def test_html_is_recognised_after_blank_lines_and_a_bom():
    page = codecs.BOM_UTF8 + b"\r\n\r\n  <HTML><body>Sign in</body></HTML>"
    with pytest.raises(DeviceListError, match="HTML page"):
        read_device_file(page)


def test_nul_bytes_later_in_a_file_mean_binary():
    names = "".join(f"name-{i:05d}\n" for i in range(10_000)).encode()  # 110 KB, past the first chunk
    with pytest.raises(DeviceListError, match="binary file"):
        read_device_file(names + b"\x00\x01\x02" + names)
    with pytest.raises(DeviceListError, match="binary file"):
        read_device_file(b"name-00001\n\x00\x01\x02\n")


def test_header_names_match_loosely_and_the_best_delimiter_wins():
    data = b" device name ;NICKNAME;Site, Hall\nunit-0001;Unit_1;HZ, 3\n"
    result = read_device_file(data)
    assert result.devices == [Device("unit-0001", "Unit_1")]


def test_quoted_cells_are_unquoted():
    data = b'DeviceName,DeviceNickname,Notes\n"unit-0001","Unit_1","has, a comma"\n"unit-0002",,"say ""hi"""\n'
    assert read_device_file(data).devices == [Device("unit-0001", "Unit_1"), Device("unit-0002")]
    assert read_device_file(b'"unit-0001"\n"unit-0002"\n').devices == [Device("unit-0001"), Device("unit-0002")]


def test_a_title_line_on_a_headerless_list_is_not_taken_for_a_device():
    result = read_device_file(b"Devices\nunit-0001\n")
    assert result.devices == [Device("unit-0001")]
    assert result.rejected == [
        Rejected(1, "Devices", 'looks like a column title: title the column "DeviceName" or delete the line')
    ]


@pytest.mark.parametrize(("header", "nickname"), [("DeviceName", ""), ("DeviceName,DeviceNickname", ",Unit_1")])
def test_a_repeated_header_from_joined_files_is_not_a_device(header, nickname):
    result = read_device_file(f"{header}\nunit-0001{nickname}\n{header}\nunit-0002{nickname}\n".encode())
    assert [d.name for d in result.devices] == ["unit-0001", "unit-0002"]
    reason = "this is a header line, not a device: delete the line"
    assert result.rejected == [Rejected(3, "DeviceName", reason)]


def test_columns_may_come_in_any_order():
    data = b"Notes,Nickname,Site,DeviceName\nspare,Unit_1,HZ,unit-0001\n,,HZ,unit-0002\nnew,Unit_3,,unit-0003\n"
    devices = [Device("unit-0001", "Unit_1"), Device("unit-0002"), Device("unit-0003", "Unit_3")]
    assert read_device_file(data).devices == devices


def test_a_short_nickname_among_good_rows_is_caught():
    data = b"DeviceName,DeviceNickname\nunit-0001,Unit_1\nunit-0002,U2\nunit-0003,\xe6\xb3\xb5\n"
    result = read_device_file(data)
    assert [d.name for d in result.devices] == ["unit-0001"]
    assert outcome(result)[1] == [
        (3, "unit-0002", "nickname too short: 2 characters, at least 4"),
        (4, "unit-0003", "nickname too short: 2 (Chinese and Japanese characters count 2), at least 4"),
    ]


def test_nicknames_are_registered_in_composed_form():
    decomposed = unicodedata.normalize("NFD", "ガス検知器")
    assert decomposed != "ガス検知器"
    result = read_device_file(f"DeviceName,DeviceNickname\ngas-0001,{decomposed}\n".encode())
    assert result.devices == [Device("gas-0001", "ガス検知器")]


def test_a_very_long_bad_value_is_shown_cut_but_measured_whole():
    result = read_device_file(b"unit-0001\n" + b"x" * 5000 + b"\n")
    (rejected,) = result.rejected
    assert rejected.reason == "too long: 5000 characters, at most 32"
    assert len(rejected.value) == 80 and rejected.value.endswith("…")


def test_text_instead_of_bytes_is_a_programming_error():
    with pytest.raises(TypeError, match="parse_pasted"):
        read_device_file("unit-0001\n")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="binary mode"):
        read_device_file(io.StringIO("unit-0001\n"))  # type: ignore[arg-type]


# --- limits ---------------------------------------------------------------------------------------


def test_a_file_over_the_size_cap_is_refused():
    data = "".join(f"unit-{i:04d}\n" for i in range(110)).encode()  # 10 bytes a line
    with pytest.raises(DeviceListError, match="^big.csv is larger than 1 KB: split the list into smaller files"):
        read_device_file(data, filename="big.csv", max_bytes=1024)
    assert len(read_device_file(data[:1020], max_bytes=1024).devices) == 102  # at the cap: fine
    assert len(read_device_file(io.BytesIO(data[:1020]), max_bytes=1024).devices) == 102
    with pytest.raises(DeviceListError, match="larger than 1 KB"):
        read_device_file(io.BytesIO(data), max_bytes=1024)


def test_an_endless_upload_is_cut_off_at_the_cap():
    endless = (f"unit-{i:06d}\n".encode() for i in itertools.count())
    with pytest.raises(DeviceListError, match="^this file is larger than 64 KB: split the list into smaller"):
        read_device_file(endless, max_bytes=64 * 1024)


def test_past_the_first_thousand_rejections_they_are_counted_not_kept():
    data = b"good-0001\n" + b"bad!\n" * 5000
    result = read_device_file(data)
    assert result.rejected_count == 5000
    assert len(result.rejected) == 1000
    assert result.rejected[-1] == Rejected(1001, "bad!", f"'!' is not allowed: {NAME_RULE}")
    assert [d.name for d in result.devices] == ["good-0001"]


def test_every_repeat_is_reported_with_the_first_line_and_dropped():
    data = b"DeviceName,DeviceNickname\nunit-0001,First\nunit-0002,\nunit-0001,Second\n\nunit-0001,Third\nunit-0002\n"
    result = read_device_file(data)
    assert result.devices == [Device("unit-0001", "First"), Device("unit-0002")]
    assert outcome(result)[1] == [
        (4, "unit-0001", "duplicate of line 2"),
        (6, "unit-0001", "duplicate of line 2"),
        (7, "unit-0002", "duplicate of line 3"),
    ]
    assert result.duplicates == 3


def test_repeats_after_blank_rows_point_at_the_first_line():
    rows = [f"unit-{i:04d},Unit_{i}" if i % 7 else "" for i in range(1, 200)] + ["unit-0150,Again"]
    result = read_device_file(("DeviceName,DeviceNickname\n" + "\n".join(rows)).encode())
    assert outcome(result)[1] == [(201, "unit-0150", "duplicate of line 151")]
    lines = [f"unit-{i:04d}" if i % 7 else "" for i in range(1, 200)] + ["unit-0150"]
    result = read_device_file("\n".join(lines).encode())
    assert outcome(result)[1] == [(200, "unit-0150", "duplicate of line 150")]


def test_repeats_in_a_large_file_point_at_the_first_line():
    names = [f"unit-{i:05d}" for i in range(20000)]
    data = "\n".join(names + names[:3]).encode()
    result = read_device_file(data)
    assert len(result.devices) == 20000
    assert outcome(result)[1] == [(20001 + i, names[i], f"duplicate of line {i + 1}") for i in range(3)]


def test_a_file_with_no_valid_name_is_refused_with_the_first_reasons():
    with pytest.raises(DeviceListError) as refused:
        read_device_file(b"DeviceName\nab\nsensor#1\nx y z\nq\n")
    assert refused.value.message == (
        "no valid device names (4 rejected: line 2: 'ab': too short: 2 characters, at least 4; "
        f"line 3: 'sensor#1': '#' is not allowed: {NAME_RULE}; "
        f"line 4: 'x y z': a space is not allowed: {NAME_RULE}; …)"
    )
    assert [r.line for r in refused.value.rejected] == [2, 3, 4, 5]


def test_100k_lines_are_read_without_a_pathological_slowdown():
    """A guard against quadratic behaviour, not a benchmark (bench/ measures; here ~0.2-0.35 s)."""
    text = "".join(f"sensor-hz-{i:06d}\n" for i in range(100_000)).encode()
    rows = "".join(f"sensor-hz-{i:06d},车间_温度{i},HZ\n" for i in range(100_000))
    table = ("DeviceName,DeviceNickname,Site\n" + rows).encode()
    for data in (text, table):
        best = float("inf")
        for _ in range(3):  # the best of three, so a busy machine does not fail the test
            start = time.perf_counter()
            result = read_device_file(data)
            best = min(best, time.perf_counter() - start)
        assert len(result.devices) == 100_000 and result.rejected_count == 0
        assert best < 2.0


# --- the rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("abcd", None),
        ("a" * 32, None),
        ("-abc1", None),  # starts like a spreadsheet formula, but every character is allowed
        ("@dev:01.a_b", None),
        ("abc", "too short: 3 characters, at least 4"),
        ("a", "too short: 1 character, at least 4"),
        ("", "name is empty"),
        ("a" * 33, "too long: 33 characters, at most 32"),
        ("dev#01", f"'#' is not allowed: {NAME_RULE}"),
        ("+dev01", f"'+' is not allowed: {NAME_RULE}"),
        ("=1+2", f"'=' and '+' are not allowed: {NAME_RULE}"),
        ("=cmd|' /C calc'!A0", f"'=', '|', \"'\" and 3 more are not allowed: {NAME_RULE}"),
        ("dev\u200b01", f"an invisible character (U+200B) is not allowed: {NAME_RULE}"),
        ("dev\t001", f"a tab is not allowed: {NAME_RULE}"),
        ("温度传感器1", f"'温', '度', '传' and 2 more are not allowed: {NAME_RULE}"),
        ("ｄｅｖ－０１", "full-width characters are not allowed ('ｄ', 'ｅ', 'ｖ' and 3 more): type them half-width"),
    ],
)
def test_device_name_rules(name, reason):
    assert validate_name(name) == reason


@pytest.mark.parametrize(
    ("nickname", "length", "reason"),
    [
        ("Pump_1", 6, None),
        ("温度", 4, None),
        ("ガス", 4, None),
        ("温a", 3, "nickname too short: 3 (Chinese and Japanese characters count 2), at least 4"),
        ("abc", 3, "nickname too short: 3 characters, at least 4"),
        ("a" * 64, 64, None),
        ("a" * 65, 65, "nickname too long: 65 characters, at most 64"),
        ("温" * 32, 64, None),
        ("温" * 35, 70, "nickname too long: 70 (Chinese and Japanese characters count 2), at most 64"),
        ("佐々木_ライン〇", 15, None),
        ("Pump 1", 6, f"a space is not allowed in a nickname: {NICK_RULE}"),
        ("泵-1号", 6, f"'-' is not allowed in a nickname: {NICK_RULE}"),
        ("一号（备用）", 10, f"'（' and '）' are not allowed in a nickname: {NICK_RULE}"),
        ("", 0, "nickname is empty"),
    ],
)
def test_nickname_rules_count_chinese_and_japanese_characters_twice(nickname, length, reason):
    assert nickname_length(nickname) == length
    assert validate_nickname(nickname) == reason


ALLOWED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_@.:")


@given(st.text(alphabet=st.sampled_from(sorted(ALLOWED) + list("#! =温\u200bＡ")), max_size=40))
def test_a_name_is_accepted_exactly_when_the_platform_would(name):
    reason = validate_name(name)
    assert (reason is None) == (4 <= len(name) <= 32 and set(name) <= ALLOWED)
    assert reason is None or reason  # a refusal always says why


# --- pasted and typed names ---------------------------------------------------------------------------


def test_names_typed_after_a_command_are_numbered_by_position():
    result = parse_pasted("unit-0001 unit-0002,unit-0003 ab unit-0001")
    assert [d.name for d in result.devices] == ["unit-0001", "unit-0002", "unit-0003"]
    assert [str(r) for r in result.rejected] == [
        "item 4: 'ab': too short: 2 characters, at least 4",
        "item 5: 'unit-0001': duplicate of item 1",
    ]


def test_names_pasted_in_a_box_are_numbered_by_line():
    text = "# hall 3\r\nunit-0001\r\n\r\nunit-0002 unit#3\r\nunit-0001\r\n"
    result = parse_pasted(text)
    assert [d.name for d in result.devices] == ["unit-0001", "unit-0002"]
    assert [(r.where, r.value, r.reason) for r in result.rejected] == [
        ("line 4, item 2", "unit#3", f"'#' is not allowed: {NAME_RULE}"),
        ("line 5", "unit-0001", "duplicate of line 2"),
    ]


def test_pasted_names_may_be_separated_the_chinese_way():
    result = parse_pasted("unit-0001，unit-0002、unit-0003；unit-0004")
    assert [d.name for d in result.devices] == ["unit-0001", "unit-0002", "unit-0003", "unit-0004"]


def test_nothing_pasted_or_nothing_valid_is_refused():
    with pytest.raises(DeviceListError, match="^no device names given$"):
        parse_pasted(" \n\n # just a comment\n")
    with pytest.raises(DeviceListError, match=r"^no valid device names \(1 rejected: item 1: 'ab': too short"):
        parse_pasted("ab")


# --- properties --------------------------------------------------------------------------------------

# Words that a first line is taken for a header or a column title by (spaces, _ and - aside).
TITLES = {
    "devicename", "devicenickname", "nickname", "name", "names", "device", "devices",
    "devicenames", "deviceid", "serial", "serialnumber", "imei",
}  # fmt: skip


def title_key(value: str) -> str:
    return re.sub(r"[\s_\-]", "", value).lower()


def not_a_title(name: str) -> bool:
    return title_key(name) not in TITLES


valid_names = st.from_regex(r"[A-Za-z0-9\-_@.:]{4,32}", fullmatch=True).filter(not_a_title)
CJK_SAMPLE = "温度传感器车间一号ライン湿ガスの々〇"
nickname_chars = st.sampled_from(list("abcXYZ019_") + list(CJK_SAMPLE))
valid_nicknames = st.text(nickname_chars, min_size=2, max_size=40).filter(
    lambda k: 4 <= len(k) + sum(c in CJK_SAMPLE for c in k) <= 64
)


def encode(text: str, encoding: str) -> bytes:
    if encoding == "utf-16-be+bom":
        return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    return text.encode(encoding)  # "utf-16" writes a BOM, as does "utf-8-sig"


@st.composite
def written_lists(draw):
    """A valid device list and its bytes, written the way some tool might."""
    pairs = st.tuples(valid_names, st.none() | valid_nicknames)
    devices = draw(st.lists(pairs, min_size=1, max_size=60, unique_by=lambda d: d[0]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    if draw(st.booleans()):
        pad = st.sampled_from(["", " ", "\t"])
        lines = [draw(pad) + name + draw(pad) for name, _ in devices]
        devices = [(name, None) for name, _ in devices]
    else:
        delimiter = draw(st.sampled_from([",", ";", "\t"]))
        header = [draw(st.sampled_from(["DeviceName", "devicename", " Device Name ", "DEVICE_NAME"])),
                  draw(st.sampled_from(["DeviceNickname", "Nickname", "nickname"])), "Site"]  # fmt: skip
        order = draw(st.permutations([0, 1, 2]))
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=delimiter, quoting=quoting, lineterminator="\n")
        for row in [header] + [[name, nickname or "", "Hall 3"] for name, nickname in devices]:
            writer.writerow([row[i] for i in order])
        lines = buffer.getvalue().split("\n")[:-1]
    text = newline.join(lines) + draw(st.sampled_from(["", newline, newline * 3]))
    data = encode(text, draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-be+bom"])))
    cut = draw(st.sampled_from([1, 3, 64, 1 << 16]))
    return [Device(name, nickname) for name, nickname in devices], data, cut


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(written_lists())
def test_any_valid_list_reads_back_as_written(case):
    devices, data, cut = case
    result = read_device_file(iter(chunked(data, cut)))
    assert result.devices == devices
    assert result.rejected == [] and result.rejected_count == 0


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=3000),
        st.binary(max_size=300).map(lambda b: codecs.BOM_UTF16_LE + b),
        st.binary(max_size=300).map(lambda b: b"DeviceName,DeviceNickname\n" + b),
        st.text(max_size=300).map(lambda t: t.encode("utf-8")),
    ),
    st.sampled_from([1, 5, 1 << 16]),
)
def test_whatever_is_uploaded_the_answer_is_a_list_or_a_reason(data, cut):
    try:
        result = read_device_file(iter(chunked(data, cut)))
    except DeviceListError as refused:
        assert refused.message
        return
    assert result.devices
    assert all(validate_name(d.name) is None for d in result.devices)
    assert all(d.nickname is None or validate_nickname(d.nickname) is None for d in result.devices)
    assert len({d.name for d in result.devices}) == len(result.devices)
    assert all(1 <= r.line <= result.lines_read and r.reason for r in result.rejected)


# Values a line may hold: valid names, names with something wrong, blanks and comments. No
# delimiter, quote or "<" (a first line with those is a CSV header or an HTML page).
odd_values = st.text(
    alphabet=st.sampled_from(sorted(ALLOWED)[:20] + list("-.#!=温Ａ \u3000\xa0\u200b")), max_size=36
)
line_values = st.one_of(valid_names, valid_names, odd_values, st.just(""), st.just("# note"))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(line_values, min_size=1, max_size=80),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.sampled_from(["utf-8", "utf-16"]),
    st.sampled_from([1, 7, 1 << 16]),
)
def test_every_rejection_points_at_its_physical_line(values, newline, encoding, cut):
    assume(not any(title_key(v) in TITLES for v in values))  # "name" on line 1 is a column title
    expected_devices: list[Device] = []
    expected_rejected: list[tuple[int, str, str]] = []
    first_line: dict[str, int] = {}
    for line, raw in enumerate(values, 1):
        value = raw.strip()
        if not value or value.startswith("#"):
            continue
        reason = validate_name(value)
        if reason is None and value in first_line:
            reason = f"duplicate of line {first_line[value]}"
        if reason is None:
            first_line[value] = line
            expected_devices.append(Device(value))
        else:
            expected_rejected.append((line, value[:79] + "…" if len(value) > 80 else value, reason))
    data = encode(newline.join(values), encoding)
    try:
        result = read_device_file(iter(chunked(data, cut)))
    except DeviceListError:
        assert not expected_devices
        return
    assert result.devices == expected_devices
    assert outcome(result)[1] == expected_rejected
    assert result.lines_read == len(values) - (values[-1] == "")  # a last line end ends a line
    for line, value, _ in expected_rejected:
        assert values[line - 1].strip() == value


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(valid_names | odd_values, st.none() | valid_nicknames | odd_values), max_size=60),
    st.sampled_from([1, 1 << 16]),
)
def test_every_rejected_row_of_a_csv_points_at_its_line(rows, cut):
    lines = ["DeviceName,DeviceNickname"] + [f"{name},{nickname or ''}" for name, nickname in rows]
    expected_devices, expected_rejected, first_line = [], [], {}
    for line, (raw_name, raw_nick) in enumerate(rows, 2):
        name, nick = raw_name.strip(), unicodedata.normalize("NFC", (raw_nick or "").strip())
        if not name:
            if nick:
                expected_rejected.append((line, lines[line - 1].strip(), "no DeviceName on this line"))
            continue
        reason, value = validate_name(name), name
        if reason is None and name.lower() == "devicename":
            reason = "this is a header line, not a device: delete the line"
        if reason is None and nick and validate_nickname(nick):
            reason = validate_nickname(nick)  # the value stays the name: the line is the device's
        if reason is None and name in first_line:
            reason = f"duplicate of line {first_line[name]}"
        if reason is None:
            first_line[name] = line
            expected_devices.append(Device(name, nick or None))
        else:
            expected_rejected.append((line, value, reason))
    data = "\n".join(lines).encode()
    try:
        result = read_device_file(iter(chunked(data, cut)))
    except DeviceListError:
        assert not expected_devices
        return
    assert result.devices == expected_devices
    assert outcome(result)[1] == expected_rejected
