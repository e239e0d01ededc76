"""Whatever its shape, a file under the size cap is read in time and memory that grow with its size
alone, and gets the same answer however its bytes arrive.

The shapes are the ones that broke readers before (a header of a million commas, a line of quotes,
a 10 MB name, millions of tiny bad lines, tens of thousands of columns); each is generated here at
a size the old reader took well over ten seconds (or hundreds of megabytes) on. Time is measured
alone, memory with tracemalloc in a second read. ``bench/bench_files.py`` measures the same shapes
at the full 10 MB.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.names import DeviceListError, read_device_file

MB = 1_000_000
#: A generous wall-clock bound for about 10 MB on a loaded two-core machine; measured alone, the
#: worst of these takes about 1.3 s (bench/RESULTS.md). The old reader took 14 s to minutes.
SECONDS = 8.0


def answer(data: bytes, cut: int | None = None):
    try:
        result = read_device_file(data if cut is None else iter([data[i : i + cut] for i in range(0, len(data), cut)]))
    except DeviceListError as refused:
        return refused.message
    return [d.name for d in result.devices], [(r.line, r.reason) for r in result.rejected], result.rejected_count


def measured(data: bytes) -> tuple[object, float, int]:
    """The answer, the seconds it took, and the peak of Python memory in a second read (bytes)."""
    started = time.perf_counter()
    result = answer(data)
    seconds = time.perf_counter() - started
    tracemalloc.start()
    try:
        answer(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, seconds, peak


def rows(line: bytes, header: bytes = b"", size: int = 9_800_000) -> bytes:
    return header + line * ((size - len(header)) // len(line))


WORST: dict[str, tuple[Callable[[], bytes], Callable[[object], bool]]] = {
    # 14 s and 1 GB before: a pattern with a group per column.
    "a header of a million commas": (
        lambda: b"," * 1_000_000 + b"DeviceName\n" + b"," * 1_000_000 + b"wide-0001\n",
        lambda got: isinstance(got, str) and "has 1,000,001 columns" in got,
    ),
    # +595 MB before: backtracking over quotes.
    "a line of 9.9 MB of quotes": (
        lambda: b"DeviceName,DeviceNickname\n" + b'"' * 9_900_000 + b"\nquo-0001,Pump_1\n",
        lambda got: got[0] == ["quo-0001"] and got[2] == 1,
    ),
    "a name of 9.8 MB": (
        lambda: b"ok-00001\n" + b"m" * 9_800_000 + b"\nok-00002\n",
        lambda got: got[0] == ["ok-00001", "ok-00002"] and got[1] == [(2, "too long: 9800000 characters, at most 32")],
    ),
    "a field of 9.8 MB after the name": (
        lambda: b"DeviceName,Notes\nlong-0001," + b"z" * 9_800_000 + b"\nlong-0002,x\n",
        lambda got: got[0] == ["long-0001", "long-0002"],
    ),
    "4.9 million one-letter lines": (
        lambda: rows(b"a\n", b"ok-00001\n"),
        lambda got: got[0] == ["ok-00001"] and got[2] == 4_899_995,
    ),
    "9.8 million blank lines before the header": (
        lambda: b"\r" * 9_800_000 + b"DeviceName\nok-00001\n",
        lambda got: got[0] == ["ok-00001"],
    ),
    "60,000 tiny columns, the name last": (
        lambda: rows(b"x," * 60_000 + b"tiny-0001\n", b"c," * 60_000 + b"DeviceName\n"),
        lambda got: got[0] == ["tiny-0001"] and got[2] == len(got[1]) > 0,  # the rest are repeats
    ),
    "lines of separators": (
        lambda: rows(b",;\t" * 1000 + b"\n", b"DeviceName,DeviceNickname\nsep-0001,Pump_1\n"),
        lambda got: got[0] == ["sep-0001"],
    ),
    "quotes opened and never closed": (
        lambda: rows(b'"ub-0001,Pump\n', b"DeviceName,DeviceNickname\nok-00001,Pump_1\n", size=3_000_000),
        lambda got: isinstance(got, tuple) and got[0] == ["ok-00001"],
    ),
}


@pytest.mark.parametrize("shape", sorted(WORST))
def test_a_worst_case_file_is_read_in_bounded_time_and_memory(shape):
    make, expected = WORST[shape]
    data = make()
    got, seconds, peak = measured(data)
    assert expected(got), f"{shape}: {str(got)[:300]}"
    assert seconds < SECONDS, f"{shape}: {seconds:.1f} s"
    assert peak < 6 * len(data) + 30 * MB, f"{shape}: {peak / MB:.0f} MB peak for {len(data) / MB:.1f} MB"


def test_a_late_control_character_gets_the_same_answer_in_any_chunks():
    # 500 names, and at byte 4,500 a line with an ANSI colour escape: one bad line, never "binary".
    names = [b"late-%04d\n" % i for i in range(501)]
    data = b"".join(names[:450]) + b"late-\x1b[31mred\n" + b"".join(names[450:])
    whole = answer(data)
    assert len(whole[0]) == 501 and [line for line, _ in whole[1]] == [451]
    for cut in (1, 1000, 4096, 4500, 65_536):
        assert answer(data, cut) == whole


# -- fuzzed shapes ---------------------------------------------------------------------------------


@st.composite
def shaped_files(draw) -> bytes:
    """A CSV or a list built from a shape: how many columns, where the name is, how long the fields
    are, how many quotes, which delimiter, which line end."""
    delimiter = draw(st.sampled_from([b",", b";", b"\t"]))
    columns = draw(st.sampled_from([1, 2, 3, 40, 1000, 20_000, 70_000]))
    name_at = draw(st.integers(0, columns - 1))
    field = draw(st.sampled_from([0, 1, 5, 40, 5000, 200_000]))
    filler = draw(st.sampled_from([b"x", b'"', b'""', b'"x', b" ", delimiter, b"\xc3", b"\xce\xc2"]))
    newline = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    count = draw(st.integers(1, 40))
    header = [b"c"] * columns
    header[name_at] = b"DeviceName"
    lines = [delimiter.join(header)] if draw(st.booleans()) else []
    cell = (filler * field)[:field]
    width = min(columns, max(1, MB // (field + 1)))  # a row of at most about 1 MB
    for _ in range(count):
        cells = [cell] * width
        cells[min(name_at, width - 1)] = b"dev-%04d" % draw(st.integers(0, 50))
        if draw(st.booleans()):
            cells[0] = b'"' + cells[0]
        lines.append(delimiter.join(cells))
        if sum(map(len, lines)) > 2 * MB:
            break
    return newline.join(lines) + newline


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shaped_files(), st.integers(1, 70_000))
def test_any_shape_reads_in_linear_time_and_memory_the_same_in_any_chunks(data, cut):
    got, seconds, peak = measured(data)
    assert seconds < 2.0 + len(data) / MB, f"{seconds:.1f} s for {len(data):,} bytes"
    assert peak < 6 * len(data) + 20 * MB, f"{peak / MB:.0f} MB for {len(data):,} bytes"
    assert answer(data, cut) == got
