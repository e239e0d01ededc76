"""How fast, and in how much memory, ``bot.names.read_device_file`` reads a large device list.

Each measurement runs in a fresh interpreter that imports only ``bot.names``, opens a file on disk
and hands the open file to the reader (the way an upload is streamed): the time is the reader's
parse and validation, including building the :class:`~bot.names.Device` objects; the peak is the
child's ``ru_maxrss`` as is, next to its baseline (the same interpreter before reading), so the
reader's own share is visible. Inputs are interleaved run by run, so machine noise hits all alike.

Targets (the project's): 100,000 lines in under 0.5 s; 1,000,000 lines under 200 MB peak RSS
(MB = 10^6 bytes). Names are ``d0000000`` style, 9 bytes a line, so 1,000,000 lines (9 MB) stay
under the reader's 10 MiB default cap without raising ``max_bytes``.

Worst cases: files of about 9.8 MB (under the cap) shaped to hurt a reader: a header of millions
of commas, a line of quotes, a 9.8 MB name or field, millions of tiny bad lines or blank lines,
tens of thousands of columns, quotes never closed, lines of separators, GB18030 text. Target: each
in under 2 s and 200 MB peak RSS, whatever the answer (a list, or a refusal saying why).

    python bench/bench_files.py            # about 20 s
    python bench/bench_files.py --quick    # about a second: checks the script works
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from common import median, report, table

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child: nothing imported but bot.names and what measuring needs.
#
# Beware: on Linux a child's ru_maxrss starts at its parent's peak RSS (the kernel carries the old
# address space's high-water mark across exec), so a parent that once held a big list makes every
# child look big. The parent here stays small (it writes the inputs a line at a time), and the child
# also reports VmHWM, the high-water mark of its own address space only, as a cross-check.
CHILD = """
import json, resource, sys, time
import bot.names
def hwm():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
path, expected = sys.argv[1], int(sys.argv[2])
with open(path, "rb") as file:
    started = time.perf_counter()
    result = bot.names.read_device_file(file)
    seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert len(result.devices) == expected and result.rejected_count == 0, (len(result.devices), result.rejected_count)
print(json.dumps({"seconds": seconds, "peak_kib": peak, "baseline_kib": baseline, "hwm_kib": hwm()}))
"""

# The same for a worst case: any answer will do, and it is reported.
CHILD_WORST = CHILD.replace(
    "    result = bot.names.read_device_file(file)\n",
    "    try:\n        result = bot.names.read_device_file(file)\n"
    "        answer = f'{len(result.devices):,} devices, {result.rejected_count:,} rejected, {result.encoding}'\n"
    "    except bot.names.DeviceListError as refused:\n        answer = 'refused: ' + refused.message[:70]\n",
).replace("assert len(result.devices) == expected and result.rejected_count == 0, (len(result.devices), result.rejected_count)\n", "").replace(
    '"hwm_kib": hwm()}', '"hwm_kib": hwm(), "answer": answer}'
)

SIZE = 9_800_000


def _repeat(line: bytes, header: bytes = b"", size: int = SIZE) -> Iterator[bytes]:
    yield header
    block = line * max(1, 65_536 // len(line))
    for _ in range((size - len(header)) // len(block)):
        yield block


#: label -> the file's bytes, in pieces (the parent writes them out without holding the file).
WORST: dict[str, Callable[[], Iterable[bytes]]] = {
    "header of 4.9M commas": lambda: [b"," * (SIZE // 2), b"DeviceName\n", b"," * (SIZE // 2), b"wide-0001\n"],
    "header of 65,535 columns, name last": lambda: _repeat(b"," * 65_535 + b"wide-0001\n", b"," * 65_535 + b"DeviceName\n"),
    "30,000 tiny columns": lambda: _repeat(b"dev-0001" + b",x" * 30_000 + b"\n", b"DeviceName" + b",c" * 30_000 + b"\n"),
    "a line of 9.8 MB of quotes": lambda: [b"DeviceName,DeviceNickname\n", b'"' * SIZE, b"\nquo-0001,Pump_1\n"],
    "lines of 999 quotes": lambda: _repeat(b'"' * 999 + b"\n", b"DeviceName,DeviceNickname\n"),
    "quotes never closed": lambda: _repeat(b'"dev-0001,Pump\n', b"DeviceName,DeviceNickname\nok-00001,Pump_1\n"),
    "a name of 9.8 MB": lambda: [b"ok-00001\n", b"m" * SIZE, b"\n"],
    "a field of 9.8 MB": lambda: [b"DeviceName,Notes\nlong-0001,", b"z" * SIZE, b"\nlong-0002,x\n"],
    "lines of 5,000 separators": lambda: _repeat(b";" * 5_000 + b"\n", b"DeviceName\nok-00001\n"),
    "9.8M blank lines, then the header": lambda: [b"\r" * SIZE, b"DeviceName\nok-00001\n"],
    "4.9M one-letter lines": lambda: _repeat(b"a\n", b"ok-00001\n"),
    "4.9M comment lines": lambda: _repeat(b"#\n", b"ok-00001\n"),
    "2.4M bad CSV rows": lambda: _repeat(b"a,b\n", b"DeviceName,DeviceNickname\nok-00001,Pump_1\n"),
    "980k repeats of one name": lambda: _repeat(b"abcd-0001\n"),
    "GB18030, 700k bad names": lambda: _repeat("设备一号,温度\n".encode("gb18030"), b"DeviceName,DeviceNickname\n"),
    "a late escape in 1M names": lambda: chain(  # at byte 4,500: one bad line, not a binary file
        (b"d%07d\n" % i for i in range(500)), [b"late-\x1b[31mred\n"], (b"d%07d\n" % i for i in range(500, 1_000_000))
    ),
}

# Chinese numerals, so every character of a nickname is a CJK one (each counted 2 by the platform).
_CJK_DIGITS = str.maketrans("0123456789", "〇一二三四五六七八九")


@dataclass(frozen=True)
class Case:
    label: str
    lines: int
    csv: bool = False

    def write(self, directory: Path) -> Path:
        path = directory / f"{'csv' if self.csv else 'plain'}-{self.lines}.{'csv' if self.csv else 'txt'}"
        with path.open("w", encoding="utf-8") as out:  # a line at a time: the parent stays small
            if self.csv:
                out.write("DeviceName,DeviceNickname\n")
                # e.g. d0000042,温度传感器〇〇〇〇〇四二: 12 CJK characters, a nickname length of 24
                out.writelines(f"d{i:07d},温度传感器{f'{i:07d}'.translate(_CJK_DIGITS)}\n" for i in range(self.lines))
            else:
                out.writelines(f"d{i:07d}\n" for i in range(self.lines))
        return path


@dataclass
class Sample:
    seconds: float
    peak_mb: float
    baseline_mb: float
    hwm_mb: float
    answer: str = ""

    @property
    def share_mb(self) -> float:
        return self.peak_mb - self.baseline_mb


def measure(path: Path, lines: int, child: str = CHILD) -> Sample:
    done = subprocess.run(
        [sys.executable, "-c", child, str(path), str(lines)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"the child failed on {path.name}:\n{done.stderr}")
    out = json.loads(done.stdout)
    mb = 1024 / 1e6  # Linux reports ru_maxrss and VmHWM in KiB
    sample = Sample(out["seconds"], out["peak_kib"] * mb, out["baseline_kib"] * mb, out["hwm_kib"] * mb, out.get("answer", ""))
    if sample.peak_mb > sample.hwm_mb + 1:
        print(f"warning: ru_maxrss {sample.peak_mb:.0f} MB > VmHWM {sample.hwm_mb:.0f} MB: inherited from the parent", file=sys.stderr)
    return sample


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a much smaller run, to check the script works")
    parser.add_argument("--runs", type=int, default=None, help="runs per input [default: 3, with --quick 1]")
    args = parser.parse_args(argv)
    scale = 50 if args.quick else 1
    runs = args.runs or (1 if args.quick else 3)

    plain_100k = Case("plain names", 100_000 // scale)
    plain_1m = Case("plain names", 1_000_000 // scale)
    csv_100k = Case("CSV, CJK nicknames", 100_000 // scale, csv=True)
    main_cases = [plain_100k, plain_1m, csv_100k]
    growth = [Case("plain names", n // scale) for n in (125_000, 250_000, 500_000)] + [plain_1m]
    cases = list(dict.fromkeys(main_cases + growth))

    samples: dict[Case, list[Sample]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="bench-files-") as tmp:
        paths = {case: case.write(Path(tmp)) for case in cases}
        sizes = {case: paths[case].stat().st_size for case in cases}
        for run in range(runs):
            for case in cases:
                sample = measure(paths[case], case.lines)
                samples[case].append(sample)
                print(f"run {run + 1}/{runs} {case.label:20} {case.lines:>9,} lines {sample.seconds:7.3f} s {sample.peak_mb:5.0f} MB", file=sys.stderr)

    def med(case: Case, what: str) -> float:
        return median([getattr(s, what) for s in samples[case]])

    def verdict(ok: bool) -> str:
        return "—" if args.quick else ("PASS" if ok else "MISS")

    targets = table(
        ["target", "measured (median)", "result"],
        [
            ["100k plain lines in < 0.5 s", f"{med(plain_100k, 'seconds'):.3f} s", verdict(med(plain_100k, "seconds") < 0.5)],
            ["100k CSV lines with CJK nicknames in < 0.5 s", f"{med(csv_100k, 'seconds'):.3f} s", verdict(med(csv_100k, "seconds") < 0.5)],
            ["1M plain lines in < 200 MB peak RSS", f"{med(plain_1m, 'peak_mb'):.0f} MB", verdict(med(plain_1m, "peak_mb") < 200)],
        ],
    )
    figures = table(
        ["input", "lines", "file MB", "best s", "median s", "best peak MB", "median peak MB", "baseline MB", "reader's share MB", "VmHWM MB"],
        [
            [
                c.label, f"{c.lines:,}", f"{sizes[c] / 1e6:.1f}",
                f"{min(s.seconds for s in samples[c]):.3f}", f"{med(c, 'seconds'):.3f}",
                f"{min(s.peak_mb for s in samples[c]):.0f}", f"{med(c, 'peak_mb'):.0f}",
                f"{med(c, 'baseline_mb'):.0f}", f"{med(c, 'share_mb'):.0f}", f"{med(c, 'hwm_mb'):.0f}",
            ]
            for c in main_cases
        ],
    )
    first = growth[0]
    curve = table(
        ["lines", "median s", "µs / line", "time × first", "median peak MB", "reader's share MB", "bytes / line", "share × first"],
        [
            [
                f"{c.lines:,}", f"{med(c, 'seconds'):.3f}", f"{med(c, 'seconds') / c.lines * 1e6:.2f}",
                f"{med(c, 'seconds') / med(first, 'seconds'):.2f}",
                f"{med(c, 'peak_mb'):.0f}", f"{med(c, 'share_mb'):.0f}", f"{med(c, 'share_mb') * 1e6 / c.lines:.0f}",
                f"{med(c, 'share_mb') / med(first, 'share_mb'):.2f}" if med(first, "share_mb") > 0.5 else "—",
            ]
            for c in growth
        ],
    )
    body = (
        f"{runs} run(s) per input, each in a fresh `python -c 'import bot.names; …'` reading the file from disk "
        "(an open binary file, default `max_bytes` of 10 MiB). Peak = the child's `ru_maxrss` as is; "
        "baseline = the same child after importing `bot.names`, before reading; reader's share = peak − baseline; "
        "VmHWM = the child's own high-water mark, a cross-check (on Linux a child's `ru_maxrss` starts at its "
        "parent's peak). MB = 10^6 bytes.\n\n"
        + (f"**--quick: sizes divided by {scale}; the targets are not judged.**\n\n" if args.quick else "")
        + targets + "\n\n" + figures
        + "\n\nGrowth (plain names; the × columns are ratios to the smallest size, 1/8 of the largest: "
        "linear growth reads 2, 4, 8):\n\n" + curve
    )
    report("read_device_file: time and peak memory", body)
    worst_cases(runs, args.quick)


def worst_cases(runs: int, quick: bool) -> None:
    """Each worst case, ``runs`` times in a fresh child: time, peak, and the answer."""
    samples: dict[str, list[Sample]] = {label: [] for label in WORST}
    with tempfile.TemporaryDirectory(prefix="bench-worst-") as tmp:
        paths = {}
        for number, (label, pieces) in enumerate(WORST.items()):
            paths[label] = Path(tmp) / f"worst-{number}.csv"
            with paths[label].open("wb") as out:
                for piece in pieces():
                    out.write(piece)
                    if quick and out.tell() > SIZE // 50:
                        break
        for run in range(runs):
            for label, path in paths.items():
                sample = measure(path, 0, CHILD_WORST)
                samples[label].append(sample)
                print(f"run {run + 1}/{runs} {label:40} {sample.seconds:7.3f} s {sample.peak_mb:5.0f} MB", file=sys.stderr)
        sizes = {label: path.stat().st_size for label, path in paths.items()}

    def med(label: str, what: str) -> float:
        return median([getattr(s, what) for s in samples[label]])

    rows = [
        [
            label, f"{sizes[label] / 1e6:.1f}", f"{med(label, 'seconds'):.2f}", f"{max(s.seconds for s in samples[label]):.2f}",
            f"{med(label, 'peak_mb'):.0f}", f"{med(label, 'hwm_mb'):.0f}", samples[label][0].answer,
            "—" if quick else ("PASS" if med(label, "seconds") < 2 and med(label, "peak_mb") < 200 else "MISS"),
        ]
        for label in WORST
    ]
    body = (
        f"{runs} run(s) per file, each in a fresh child reading it from disk (as in the entry above). "
        "Target: under 2 s and 200 MB peak RSS each (MB = 10^6 bytes).\n\n"
        + (f"**--quick: files cut to {SIZE // 50 / 1e6:.1f} MB; the targets are not judged.**\n\n" if quick else "")
        + table(["file (about 9.8 MB)", "MB", "median s", "worst s", "median peak MB", "VmHWM MB", "answer", "< 2 s, < 200 MB"], rows)
    )
    report("read_device_file: worst-case files", body)


if __name__ == "__main__":
    main()
