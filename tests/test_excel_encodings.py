"""Lists saved by Excel in its default encodings are read, and the encoding they were read in is said.

Excel on Chinese Windows saves "CSV (comma delimited)" in GB18030 (GBK); Western Windows in
Windows-1252. Without a BOM a file is decided once, on a window of its bytes from the first
non-ASCII one, and must then decode whole; UTF-8 and UTF-16 with a BOM are read as before.
"""

from __future__ import annotations

import codecs

import pytest

from bot.names import Device, DeviceListError, read_device_file

GBK_ROWS = "DeviceName,DeviceNickname\r\n" + "".join(f"gb-{i:04d},温度传感器{i}号\r\n" for i in range(1, 200))
LATIN_ROWS = "DeviceName,DeviceNickname\r\ncapteur-0001,Pompe_1\r\ncapteur-0002,Pompe_été\r\n"


def chunked(data: bytes, size: int):
    return iter([data[i : i + size] for i in range(0, len(data), size)])


def test_a_gbk_list_is_read_as_gb18030_in_any_chunks():
    data = GBK_ROWS.encode("gbk")
    for source in (data, chunked(data, 1), chunked(data, 3), chunked(data, 4096)):
        result = read_device_file(source)
        assert (result.encoding, result.read_as) == ("gb18030", "GB18030")
        assert result.devices[0] == Device("gb-0001", "温度传感器1号") and len(result.devices) == 199


def test_a_windows_1252_list_is_read_as_such_and_its_accents_judged_by_the_rules():
    result = read_device_file(LATIN_ROWS.encode("cp1252"))
    assert (result.encoding, result.read_as) == ("cp1252", "Windows-1252")
    assert result.devices == [Device("capteur-0001", "Pompe_1")]
    assert [(r.line, r.reason.split(":")[0]) for r in result.rejected] == [(3, "'é' is not allowed in a nickname")]


def test_the_encoding_is_decided_where_the_first_non_ascii_byte_is_even_far_into_the_file():
    ascii_names = "".join(f"plain-{i:06d},Pump_{i}\r\n" for i in range(20_000))  # 480 KB of ASCII first
    data = ("DeviceName,DeviceNickname\r\n" + ascii_names + "gb-9999,温度传感器\r\n").encode("gb18030")
    result = read_device_file(chunked(data, 1000))
    assert result.encoding == "gb18030" and result.devices[-1] == Device("gb-9999", "温度传感器")


@pytest.mark.parametrize("bom, encoding", [(codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le")])
def test_unicode_with_a_bom_is_read_as_before_and_not_called_legacy(bom, encoding):
    result = read_device_file(bom + GBK_ROWS.encode(encoding))
    assert (result.encoding, result.read_as) == (encoding, None)
    assert result.devices[0] == Device("gb-0001", "温度传感器1号")


def test_plain_ascii_and_utf8_are_utf8():
    assert read_device_file(b"ascii-0001\n").encoding == "utf-8"
    assert read_device_file(GBK_ROWS.encode("utf-8")).read_as is None


def test_a_file_of_mixed_encodings_is_refused_at_its_first_bad_line():
    data = "DeviceName,DeviceNickname\n mix-0001,温度_1\nmix-0002,".encode() + "Capteur_dé".encode("cp1252") + b"\n"
    with pytest.raises(DeviceListError, match="^line 3 of this file is not UTF-8 text"):
        read_device_file(data)


def test_a_gb18030_file_that_turns_out_not_to_be_is_refused_naming_the_encoding():
    # GB18030 in the first 64 KB, then a byte no GB18030 character starts with.
    data = GBK_ROWS.encode("gb18030") * 40 + b"gb-bad,\xff\xff\r\n"
    with pytest.raises(DeviceListError) as refused:
        read_device_file(data)
    assert "is not GB18030 text (it was read as GB18030, the encoding its first lines are in)" in refused.value.message
    assert refused.value.message.startswith(f"line {GBK_ROWS.count(chr(10)) * 40 + 1} of this file")
