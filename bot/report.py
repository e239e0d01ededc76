"""The files iotreg writes: each device's outcome, and device credentials.

Both are CSV that operators open in a spreadsheet, so no cell may run as a formula there: a value
that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is written with a leading
``'`` (OWASP's advice for CSV injection), unless it is a valid DeviceName in the DeviceName column, whose characters
(``A-Z a-z 0-9 - _ @ . :``) cannot form a formula that does anything, and which provisioning
scripts must read back unchanged.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from typing import Protocol

from bot.domain import OUTCOME_LABELS, REJECTED_LABEL, DeviceRow, RejectedLine


class Outcomes(Protocol):
    """Where a request's outcomes are read from (the request service, or a store)."""

    def devices(self, request_id: int) -> list[DeviceRow]: ...

    def rejected_lines(self, request_id: int) -> list[RejectedLine]: ...


OUTCOME_HEADER = ("DeviceName", "DeviceNickname", "Outcome", "Reason", "IotId", "Line")
CREDENTIALS_HEADER = ("ProductKey", "DeviceName", "DeviceSecret", "IotId")


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_@.:")


def safe_cell(value: object, *, device_name: bool = False) -> str:
    """``value`` as text a spreadsheet shows as text. ``device_name``: the DeviceName column, where a
    valid name stays byte for byte (scripts read it back)."""
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) and not (device_name and 4 <= len(text) <= 32 and set(text) <= _NAME_CHARS):
        return "'" + text
    return text


def _rows_to_csv(header: Iterable[str], rows: Iterable[Iterable[object]]) -> Iterator[str]:
    header = list(header)
    name_column = header.index("DeviceName")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    yield buffer.getvalue()
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([safe_cell(v, device_name=i == name_column) for i, v in enumerate(row)])
        yield buffer.getvalue()


def outcome_rows(store: Outcomes, request_id: int) -> Iterator[tuple[object, ...]]:
    """Every device of a request with its outcome, then every line refused before any API call."""
    for device in store.devices(request_id):
        yield (
            device.name,
            device.nickname or "",
            OUTCOME_LABELS.get(device.outcome, device.outcome),
            device.reason or "",
            device.iot_id or "",
            device.line or "",
        )
    for rejected in store.rejected_lines(request_id):
        yield (rejected.value, rejected.nickname or "", REJECTED_LABEL, rejected.reason, "", rejected.line)


def outcomes_csv(store: Outcomes, request_id: int) -> str:
    """The outcome report of a request as CSV text (for an upload)."""
    return "".join(_rows_to_csv(OUTCOME_HEADER, outcome_rows(store, request_id)))


def write_outcomes(path: Path, store: Outcomes, request_id: int) -> int:
    """Write the outcome report to ``path``; returns the number of rows."""
    count = 0
    with path.open("w", encoding="utf-8-sig", newline="") as out:  # the BOM makes Excel read UTF-8
        for count, chunk in enumerate(_rows_to_csv(OUTCOME_HEADER, outcome_rows(store, request_id))):
            out.write(chunk)
    return count


def credentials_csv(rows: Iterable[tuple[str, str, str, str]]) -> Iterator[str]:
    """``ProductKey, DeviceName, DeviceSecret, IotId`` rows as CSV text, a row at a time."""
    return _rows_to_csv(CREDENTIALS_HEADER, rows)


def write_private(path: Path, chunks: Iterable[str], *, overwrite: bool = False) -> None:
    """Write ``chunks`` to a new file only its owner can read (0600), never widening an existing one."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            fd = -1
            for chunk in chunks:
                out.write(chunk)
    finally:
        if fd != -1:
            os.close(fd)
