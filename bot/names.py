"""Device lists: read what operators upload or paste, and check every name before any API call.

What is read:

* a CSV with a header: a ``DeviceName`` column and optionally ``DeviceNickname`` (or ``Nickname``),
  in any order, other columns ignored. Header names match ignoring case, surrounding spaces and
  inner spaces, ``_`` and ``-``. The delimiter, comma, semicolon or tab (Excel in some locales and
  Excel's "Unicode text"), is sniffed from the header line;
* one name per line: a single column without a header, or plain text, where lines starting with
  ``#`` are comments;
* UTF-8 with or without a BOM, UTF-16 with a BOM (or recognisably without one), any line endings;
  without a BOM, a file that is not UTF-8 may be in one of Excel's legacy encodings, GB18030 (GBK,
  Excel on Chinese Windows) or Windows-1252: that is decided once, on a window of bytes from the
  first non-ASCII byte on (:data:`_DETECT_WINDOW`), and the whole file must then decode in it.
  :attr:`DeviceList.encoding` says which was used, :attr:`DeviceList.read_as` names a legacy one.

The rules are the platform's (alibaba-iot-api.md, "Parameters and limits"): a DeviceName is 4 to 32
characters of ``A-Z a-z 0-9 - _ @ . :``; a DeviceNickname is 4 to 64 characters of Chinese or
Japanese characters, letters, digits and ``_``, where a Chinese or Japanese character counts 2.

Problems come back two ways, by what the operator has to do:

* a bad line is a :class:`Rejected` in :attr:`DeviceList.rejected`, with its physical line number,
  the value and a reason to show as is; a repeated name is rejected with the line of its first
  occurrence, and the first one is kept;
* a file that is not a device list at all (a workbook, an HTML page, binary, empty, too large, a CSV
  without a DeviceName column, or no valid name anywhere) raises :class:`DeviceListError` with a
  message to show as is.

:func:`parse_pasted` checks names typed after a command or pasted into a text box the same way.

Files are read as a stream of bytes, a chunk at a time: only the valid devices (the output) and the
first ``keep_rejected`` rejections are kept, so a million-line file costs about as much memory as the
names in it.

The cost is bounded by the size, whatever the shape: the bytes are cut into chunks of the same size
however they arrive (so the answer does not depend on it); a long line is gathered in pieces, not
grown by copying; regular expressions that meet quotes cannot backtrack; a line is cut into at most
:data:`MAX_COLUMNS` cells (a header or a row with more is refused as such); and the fast paths,
which match a whole batch of rows with one expression, are only taken for the first
:data:`_FAST_COLUMNS` columns.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import threading
import unicodedata
from array import array
from collections.abc import Iterable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, islice, repeat
from typing import Any, BinaryIO, Literal

__all__ = [
    "DEFAULT_MAX_BYTES",
    "KEEP_REJECTED",
    "MAX_COLUMNS",
    "Device",
    "DeviceList",
    "DeviceListError",
    "Rejected",
    "nickname_length",
    "parse_pasted",
    "read_device_file",
    "validate_name",
    "validate_nickname",
]

NAME_MIN, NAME_MAX = 4, 32
NICKNAME_MIN, NICKNAME_MAX = 4, 64
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
#: Rejections kept in detail; the rest are only counted (a file of garbage must not fill memory).
KEEP_REJECTED = 1000
#: Columns a header or a row may have (Excel's own limit is 16,384): past it, a line is not a row of
#: a device list, and cutting it into cells would cost memory for nothing.
MAX_COLUMNS = 65_536

#: Anything a file can be given as: its bytes, a binary file object, or chunks (an HTTP body).
Source = bytes | bytearray | memoryview | BinaryIO | Iterable[bytes]

_CHUNK = 64 * 1024
_HEAD = 4096  # bytes (and then characters) looked at before deciding what a file is
#: Bytes from the first non-ASCII byte on that decide the encoding of a file without a BOM.
_DETECT_WINDOW = 64 * 1024
#: Excel's legacy encodings, tried when a file without a BOM is not UTF-8.
_LEGACY_ENCODINGS = ("gb18030", "cp1252")
_ENCODING_LABELS = {
    "utf-8": "UTF-8",
    "utf-16-le": "UTF-16",
    "utf-16-be": "UTF-16",
    "gb18030": "GB18030",
    "cp1252": "Windows-1252",
}
#: The fast paths match a batch of rows with one expression holding every column up to the last
#: one read: past this many columns, rows are read one by one (a pattern per column would grow
#: with the header, and so would its cost).
_FAST_COLUMNS = 32
_VALUE_SHOWN = 80  # longer values are cut in Rejected.value; the reason still counts the whole

_NAME_CLASS = r"[A-Za-z0-9\-_@.:]"
_NAME_RE = re.compile(f"{_NAME_CLASS}{{{NAME_MIN},{NAME_MAX}}}")
_NAME_CHAR_RE = re.compile(_NAME_CLASS)
# Chinese and Japanese characters, each counting 2: the iteration mark 々 and 〇, hiragana and
# katakana (with ー), CJK ideographs and extension A.
_CJK = "\u3005\u3007\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
_CJK_RE = re.compile(f"[{_CJK}]")
_NICK_CLASS = f"[A-Za-z0-9_{_CJK}]"
_NICK_RE = re.compile(f"{_NICK_CLASS}+")
_NICK_CHAR_RE = re.compile(_NICK_CLASS)
_NAME_RULE = "use letters, digits and - _ @ . :"
_NICK_RULE = "use Chinese or Japanese characters, letters, digits and _"

_DELIMITERS = ("\t", ";", ",")
_NAME_HEADER = "devicename"
_NICK_HEADERS = ("devicenickname", "nickname")
_PRODUCT_HEADER = "productkey"
# A first line of a headerless list that is one of these is a column title, not a device.
_TITLE_WORDS = frozenset(
    {"name", "names", "device", "devices", "devicenames", "deviceid", "serial", "serialnumber", "imei"}
)
# Control characters no text file has (tab, line ends, form feed and DOS's end-of-file ^Z aside).
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x19\x1b-\x1f]")
_CONTROL_BYTES_RE = re.compile(b"[\x00-\x08\x0e-\x19\x1b-\x1f]")
_NEWLINE_RE = re.compile(r"\r\n|\r|\n")
# A row of only delimiters and whitespace (an empty spreadsheet row): a blank line.
_EMPTY_ROW_RE = re.compile(r"[\s,;]*")
_PASTE_SEPARATORS = re.compile(r"[\s,;\uff0c\uff1b\u3001]+")  # also full-width ， ； and 、


class DeviceListError(ValueError):
    """The file or text is not a usable device list. The message says why and what to do.

    ``rejected`` holds the first rejected lines when the list had lines but no valid name.
    """

    def __init__(self, message: str, rejected: Iterable[Rejected] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.rejected = list(rejected)


@dataclass(frozen=True, slots=True)
class Device:
    """A device to register: a valid DeviceName and, when given, a valid nickname."""

    name: str
    nickname: str | None = None
    # Where it is in the file or text (1-based), for the outcome report; not part of what it is.
    line: int | None = field(default=None, compare=False)


class Devices(Sequence[Device]):
    """The valid devices of a list, kept as columns (names, nicknames, lines) and made into
    :class:`Device` objects only when read one by one: a million names cost a million strings, not
    a million objects as well. :meth:`rows` hands them to the store as they are kept."""

    __slots__ = ("_names", "_nicknames", "_places")

    def __init__(self, names: list[str], nicknames: list[str | None] | None, places: Sequence[Any]) -> None:
        self._names, self._nicknames, self._places = names, nicknames, places

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self._devices(index))
        nickname = self._nicknames[index] if self._nicknames else None
        return Device(self._names[index], nickname, _line_of(self._places[index]))

    def __iter__(self) -> Iterator[Device]:
        return self._devices(slice(None))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Devices({len(self):,} devices)"

    def rows(self) -> Iterator[tuple[str, str | None, int | None]]:
        """``(name, nickname, line)`` of each device, in order."""
        nicknames = self._nicknames or repeat(None)
        places = self._places if isinstance(self._places, array) else map(_line_of, self._places)
        return zip(self._names, nicknames, places)

    def _devices(self, part: slice) -> Iterator[Device]:
        names = self._names[part]
        nicknames = self._nicknames[part] if self._nicknames else repeat(None)
        places = self._places[part]
        return map(Device, names, nicknames, places if isinstance(places, array) else map(_line_of, places))


@dataclass(frozen=True, slots=True)
class Rejected:
    """A value that cannot be registered, where it was, and why (a reason to show as is).

    ``line`` is the 1-based physical line of the file or text. Pasted text sets ``item``, the
    value's position on its line, when a line holds several values, and leaves ``line`` None when
    the whole text is one line (a command's arguments).
    """

    line: int | None
    value: str
    reason: str
    item: int | None = None
    nickname: str | None = None  # the nickname given beside the value, kept for the outcome report

    @property
    def where(self) -> str:
        """``line 3``, ``line 3, item 2`` or ``item 2``."""
        return _where(self.line, self.item)

    def __str__(self) -> str:
        return f"{self.where}: {self.value!r}: {self.reason}"


@dataclass
class DeviceList:
    """The outcome of reading a device list.

    ``devices`` are the valid names in file order, each once. ``rejected`` holds the first
    :data:`KEEP_REJECTED` rejected lines in order; ``rejected_count`` counts them all, repeated
    names included; ``duplicates`` counts the repeats alone. ``lines_read`` is the number of
    physical lines, ``format`` ``"csv"`` for a file with a header, ``"text"`` for one name a line.
    """

    devices: Sequence[Device]
    rejected: list[Rejected] = field(default_factory=list)
    rejected_count: int = 0
    duplicates: int = 0
    lines_read: int = 0
    format: Literal["csv", "text"] = "text"
    #: The encoding the file was read in: ``utf-8``, ``utf-16-le``, ``utf-16-be``, or one of
    #: Excel's legacy encodings, ``gb18030`` or ``cp1252`` (then named by :attr:`read_as`).
    encoding: str = "utf-8"

    @property
    def read_as(self) -> str | None:
        """``"GB18030"`` or ``"Windows-1252"`` when the file was in a legacy encoding (front ends say
        "read as …", since a wrong guess shows as odd characters), else None."""
        return _ENCODING_LABELS[self.encoding] if self.encoding in _LEGACY_ENCODINGS else None


# --- rules -----------------------------------------------------------------------------------


def validate_name(name: str) -> str | None:
    """Why ``name`` cannot be a DeviceName, or None when it can."""
    if _NAME_RE.fullmatch(name):
        return None
    bad = _bad_characters(name, _NAME_CHAR_RE, _NAME_RULE)
    if bad:
        return bad
    return _length_problem("", len(name), NAME_MIN, NAME_MAX, " characters")


def validate_nickname(nickname: str) -> str | None:
    """Why ``nickname`` cannot be a DeviceNickname, or None when it can."""
    if not nickname.isascii():
        nickname = unicodedata.normalize("NFC", nickname)
    if not _NICK_RE.fullmatch(nickname):
        bad = _bad_characters(nickname, _NICK_CHAR_RE, _NICK_RULE, " in a nickname")
        if bad:
            return bad
    unit = " characters" if nickname.isascii() else " (Chinese and Japanese characters count 2)"
    return _length_problem("nickname ", nickname_length(nickname), NICKNAME_MIN, NICKNAME_MAX, unit)


def nickname_length(nickname: str) -> int:
    """The length the platform counts: a Chinese or Japanese character counts 2."""
    if nickname.isascii():
        return len(nickname)
    return len(nickname) + len(_CJK_RE.findall(nickname))


def _length_problem(what: str, n: int, low: int, high: int, unit: str) -> str | None:
    if n == 0:
        return f"{what or 'name '}is empty"
    if n < low:
        if n == 1 and unit == " characters":
            unit = " character"
        return f"{what}too short: {n}{unit}, at least {low}"
    if n > high:
        return f"{what}too long: {n}{unit}, at most {high}"
    return None


def _bad_characters(value: str, allowed: re.Pattern[str], rule: str, where: str = "") -> str:
    """``'#' is not allowed: <rule>``, ``'=', a space and '!' are not allowed: <rule>``, or "" when
    every character is allowed."""
    seen = {char: None for char in dict.fromkeys(value) if not allowed.match(char)}
    if not seen:
        return ""
    shown = [_describe_character(c) for c in list(seen)[:3]]
    if len(seen) > 3:
        shown.append(f"{len(seen) - 3} more")
    listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
    if all(_is_full_width(c, allowed) for c in seen):
        # Typed with a Chinese or Japanese input method on: say so, it is not obvious on screen.
        return f"full-width characters are not allowed{where} ({listed}): type them half-width"
    return f"{listed} {'is' if len(seen) == 1 else 'are'} not allowed{where}: {rule}"


def _describe_character(char: str) -> str:
    if char == " ":
        return "a space"
    if char == "\t":
        return "a tab"
    if not char.isprintable() or char.isspace():
        return f"an invisible character (U+{ord(char):04X})"
    return f'"{char}"' if char == "'" else f"'{char}'"


def _is_full_width(char: str, allowed: re.Pattern[str]) -> bool:
    if unicodedata.east_asian_width(char) != "F":
        return False
    return bool(allowed.match(unicodedata.normalize("NFKC", char)))


def _where(line: int | None, item: int | None) -> str:
    if item is None:
        return f"line {line}"
    if line is None:
        return f"item {item}"
    return f"line {line}, item {item}"


def _where_of(place: int | tuple[int | None, int | None]) -> str:
    return _where(*place) if isinstance(place, tuple) else _where(place, None)


def _line_of(place: Any) -> int | None:
    """The line of a place kept by :class:`_Collector`: a line number, or ``(line, item)``."""
    return place[0] if isinstance(place, tuple) else place


class _Collector:
    """Checks values, keeps the valid ones once each (the first time) and the first rejections.

    Sized for a million names: while reading it keeps the names in a list and a set (for repeats)
    and where each came from in a compact array; the set goes before the :class:`Device` objects
    are made, at the end. The line of a repeat's first occurrence is looked up then too, and only
    for the repeats whose rejection is kept.
    """

    def __init__(self, keep_rejected: int, *, pasted: bool = False) -> None:
        self.rejected: list[Rejected] = []
        self.rejected_count = 0
        self.duplicates = 0
        self._keep = keep_rejected
        self._names: list[str] = []
        self._nicknames: list[str | None] | None = None  # beside _names, from the first nickname on
        self._seen: set[str] = set()
        # Where _names[i] came from: a line number, or (line, item) for pasted text.
        self._places: MutableSequence[Any] = [] if pasted else array("I")
        self._repeats: list[tuple[int, str]] = []  # (index in rejected, name) to complete at the end

    def add(self, name: str, nickname: str | None, line: int | None, item: int | None = None) -> None:
        """Check one value (and its nickname) found at ``line``/``item``."""
        if not _NAME_RE.fullmatch(name):
            # Past the rejections kept in detail, counting is enough: skip working out why.
            self.reject(name, (validate_name(name) or "") if self.room() else "", line, item, nickname)
            return
        if len(name) == len(_NAME_HEADER) and name.lower() == _NAME_HEADER:
            self.reject(name, "this is a header line, not a device: delete the line", line, item)
            return
        if nickname is not None:
            if not nickname.isascii():
                nickname = unicodedata.normalize("NFC", nickname)
            reason = validate_nickname(nickname)
            if reason is not None:  # the line is the device's: listed under its name, the reason says why
                self.reject(name, reason, line, item, nickname)
                return
        if name in self._seen:
            self.duplicates += 1
            if self.reject(name, "duplicate", line, item, nickname):
                self._repeats.append((len(self.rejected) - 1, name))
            return
        self._seen.add(name)
        self._places.append(line if item is None else (line, item))
        if nickname is not None or self._nicknames is not None:
            self._nicknames_so_far().append(nickname)
        self._names.append(name)

    def extend(self, names: list[str], nicknames: list[str | None] | None, lines: Iterable[int]) -> bool:
        """Add names known to be valid (with valid nicknames) unless one is a repeat.

        Returns False, having added nothing, when a name repeats: the caller then goes line by line.
        """
        fresh = set(names)
        if len(fresh) != len(names) or not self._seen.isdisjoint(fresh):
            return False
        self._seen |= fresh
        self._places.extend(lines)
        if nicknames is not None and any(nicknames):
            self._nicknames_so_far().extend(nicknames)
        elif self._nicknames is not None:
            self._nicknames.extend([None] * len(names))
        self._names.extend(names)
        return True

    def repeats_only(self, names: list[str]) -> bool:
        """Past the rejections kept in detail: count ``names`` as repeats when every one is; False,
        having counted nothing, when one is new."""
        if self.room() or not self._seen.issuperset(names):
            return False
        self.duplicates += len(names)
        self.rejected_count += len(names)
        return True

    def _nicknames_so_far(self) -> list[str | None]:
        if self._nicknames is None:
            self._nicknames = [None] * len(self._names)
        return self._nicknames

    def _devices(self) -> Devices:
        """The devices, as the columns kept while reading (the collector lets go of them)."""
        devices = Devices(self._names, self._nicknames, self._places)
        self._names, self._nicknames, self._places = [], None, []
        return devices

    def room(self) -> bool:
        return len(self.rejected) < self._keep

    def reject(self, value: str, reason: str, line: int | None, item: int | None = None, nickname: str | None = None) -> bool:
        """Count a rejection; True when it is kept in detail."""
        self.rejected_count += 1
        if not self.room():
            return False
        if len(value) > _VALUE_SHOWN:
            value = value[: _VALUE_SHOWN - 1] + "…"
        self.rejected.append(Rejected(line, value, reason, item, nickname))
        return True

    def result(self, lines_read: int, format: Literal["csv", "text"], empty_message: str) -> DeviceList:
        """The outcome; raises :class:`DeviceListError` when no name is valid."""
        if self._repeats:
            wanted = {name for _, name in self._repeats}
            first = {name: place for name, place in zip(self._names, self._places) if name in wanted}
            for index, name in self._repeats:
                self.rejected[index] = replace(
                    self.rejected[index], reason=f"duplicate of {_where_of(first[name])}"
                )
        if not self._names:
            if not self.rejected_count:
                raise DeviceListError(empty_message)
            raise DeviceListError(_nothing_valid(self.rejected, self.rejected_count), self.rejected)
        self._seen = set()  # free it before making the devices, when memory peaks
        devices = self._devices()
        return DeviceList(
            devices=devices,
            rejected=self.rejected,
            rejected_count=self.rejected_count,
            duplicates=self.duplicates,
            lines_read=lines_read,
            format=format,
        )


def _nothing_valid(rejected: list[Rejected], count: int) -> str:
    first = "; ".join(str(r) for r in rejected[:3])
    more = "; …" if count > 3 else ""
    return f"no valid device names ({count} rejected: {first}{more})"


# --- files -----------------------------------------------------------------------------------


def read_device_file(
    data: Source,
    *,
    filename: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    keep_rejected: int = KEEP_REJECTED,
    product_key: str | None = None,
) -> DeviceList:
    """Read and check a device list from its bytes, a binary file object or an iterable of chunks.

    ``filename`` only names the file in messages. With ``product_key``, a CSV list's ``ProductKey``
    column is honoured: a row that names another product is rejected, not registered in this one. Raises :class:`DeviceListError` when the whole
    file must be refused, including when it is larger than ``max_bytes`` (counted while reading,
    so an endless stream is refused too) or has no valid name.
    """
    subject = _Subject(filename)
    reader = _LineReader(_chunks(data, max_bytes, subject), subject)
    try:
        result = _read_lines(reader, subject, keep_rejected, product_key)
    finally:
        reader.close()
    result.encoding = reader.encoding
    return result


@dataclass(frozen=True)
class _Subject:
    """How messages call the file: by its name when known."""

    filename: str | None

    @property
    def this(self) -> str:  # "this is an HTML page"
        return self.filename or "this"

    def __str__(self) -> str:  # "this file is empty"
        return self.filename or "this file"


def _chunks(data: Source, max_bytes: int, subject: _Subject) -> Iterator[bytes]:
    """The bytes in chunks of :data:`_CHUNK` (the last one shorter), however they arrive: what the
    reader decides at a chunk's edge is then the same for the same bytes. Refused past ``max_bytes``,
    counted while reading, so an endless stream is refused too."""
    too_large = f"{subject} is larger than {_size(max_bytes)}: split the list into smaller files"
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        if view.nbytes > max_bytes:
            raise DeviceListError(too_large)
        for start in range(0, view.nbytes, _CHUNK):
            yield bytes(view[start : start + _CHUNK])
        return
    if isinstance(data, str):
        raise TypeError("read_device_file() needs bytes; use parse_pasted() for text")
    read = getattr(data, "read", None)
    source: Iterable[bytes] = iter(lambda: read(_CHUNK), b"") if read else data  # type: ignore[misc]
    total = 0
    pending = bytearray()
    for chunk in source:
        if isinstance(chunk, str):
            raise TypeError("read_device_file() needs bytes: open the file in binary mode")
        if not chunk:
            continue
        total += len(chunk)
        if total > max_bytes:
            raise DeviceListError(too_large)
        pending += chunk
        if len(pending) >= _CHUNK:
            whole = len(pending) - len(pending) % _CHUNK
            view = memoryview(pending)
            chunks = [bytes(view[start : start + _CHUNK]) for start in range(0, whole, _CHUNK)]
            view.release()
            del pending[:whole]
            yield from chunks
    if pending:
        yield bytes(pending)


def _size(n: int) -> str:
    for unit, factor in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


class _Undecodable(Exception):
    """Bytes that are not text in the file's encoding; ``good`` is the text decoded before them in
    the chunk that failed."""

    def __init__(self, good: str) -> None:
        super().__init__(good)
        self.good = good


_NON_ASCII_RE = re.compile(b"[\x80-\xff]")


class _LineReader:
    """Decodes chunks into batches of physical lines (split at CR, LF or CRLF), after checking that
    the file is text at all. ``count`` is the number of lines handed out so far, ``encoding`` the
    one the file is read in (known once the first non-ASCII byte has been met)."""

    def __init__(self, chunks: Iterator[bytes], subject: _Subject) -> None:
        self._chunks = chunks
        self._subject = subject
        self.encoding = "utf-8"
        self.count = 0

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close:
            close()

    def __iter__(self) -> Iterator[list[str]]:
        head = next(self._chunks, b"")  # a whole chunk, unless the file is smaller
        if not head:
            raise DeviceListError(f"{self._subject} is empty")
        encoding, head = self._sniff(head)
        newlines = io.IncrementalNewlineDecoder(None, translate=True)
        parts: list[str] = []  # the line begun and not ended yet, in pieces: never grown by copying
        start = ""  # the first _HEAD characters, checked once they are all there
        checked = False
        texts = self._texts(encoding, chain((head,), self._chunks))
        while True:
            try:
                text = next(texts, None)
            except _Undecodable as exc:
                line = self.count + len(_NEWLINE_RE.findall(exc.good)) + 1
                raise self._undecodable(line) from None
            final = text is None
            text = newlines.decode(text or "", final=final)
            if not checked:
                start += text[: _HEAD - len(start)]
                if len(start) >= _HEAD or final:
                    self._check_start(start)
                    checked = True
            if "\x00" in text:
                raise DeviceListError(self._binary())
            if "\n" not in text:
                if text:
                    parts.append(text)
                if not final:
                    continue
                lines = ["".join(parts)] if parts else []
                parts = []
            else:
                lines = text.split("\n")
                if parts:
                    parts.append(lines[0])
                    lines[0] = "".join(parts)
                last = lines.pop()
                parts = [last] if last else []
                if final and parts:
                    lines.append(last)
            if lines:
                self.count += len(lines)
                yield lines
            if final:
                return

    def _texts(self, encoding: str | None, chunks: Iterator[bytes]) -> Iterator[str]:
        """The text of the chunks. ``encoding`` None (no BOM, not UTF-16): ASCII goes through as
        it is (it is the same in every candidate); at the first non-ASCII byte, the encoding is
        decided on a window of :data:`_DETECT_WINDOW` bytes from it, and the rest must decode in it.
        Raises :class:`_Undecodable` at the first byte that does not."""
        if encoding is None:
            encoding = "utf-8"
            for chunk in chunks:
                found = _NON_ASCII_RE.search(chunk)
                if found is None:
                    yield chunk.decode("ascii")
                    continue
                window = [chunk[found.start() :]]
                size = len(window[0])
                while size < _DETECT_WINDOW:
                    more = next(chunks, None)
                    if more is None:
                        break
                    window.append(more)
                    size += len(more)
                rest = b"".join(window)
                encoding = _detect_encoding(rest[:_DETECT_WINDOW])
                if found.start():
                    yield chunk[: found.start()].decode("ascii")
                chunks = chain((rest,), chunks)
                break
        self.encoding = encoding
        decoder = codecs.getincrementaldecoder(encoding)()
        for chunk in chain(chunks, (b"",)):
            try:
                yield decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                # The decoder still holds the bytes it kept from the last chunk: with this chunk,
                # they lead up to the bad byte at exc.start.
                pending = decoder.getstate()[0]
                raise _Undecodable((pending + chunk)[: exc.start].decode(encoding, "replace")) from None

    def _sniff(self, head: bytes) -> tuple[str | None, bytes]:
        """The encoding (None: to be decided at the first non-ASCII byte), and the head without its
        BOM; refuse what is plainly not text. Only the first :data:`_HEAD` bytes decide, so one odd
        line further on is a rejected line, not a refused file."""
        this = self._subject.this
        if head.startswith(b"PK\x03\x04"):
            raise DeviceListError(f"{this} looks like an Excel workbook or a zip file: save it as CSV")
        if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
            raise DeviceListError(f"{this} looks like an old Excel workbook (.xls): save it as CSV")
        if head.startswith(b"%PDF-"):
            raise DeviceListError(f"{this} is a PDF document, not a device list: export the list as CSV")
        if head.startswith(codecs.BOM_UTF8):
            return "utf-8", head[3:]
        if head.startswith(codecs.BOM_UTF16_LE):
            return "utf-16-le", head[2:]
        if head.startswith(codecs.BOM_UTF16_BE):
            return "utf-16-be", head[2:]
        start = head[:_HEAD]
        if b"\x00" in start:
            encoding = _utf16_without_bom(start)
            if encoding is None:
                raise DeviceListError(self._binary())
            return encoding, head
        if _CONTROL_BYTES_RE.search(start):
            raise DeviceListError(self._binary())
        return None, head

    def _check_start(self, text: str) -> None:
        start = text[:_HEAD].lower()
        # Slack answers a download it does not authorise with its sign-in page.
        if "<!doctype html" in start or "<html" in start:
            raise DeviceListError(f"{self._subject.this} is an HTML page, not a device list")
        if _CONTROL_RE.search(start):
            raise DeviceListError(self._binary())

    def _binary(self) -> str:
        return f"{self._subject.this} is a binary file, not a device list: upload a CSV or a text file"

    def _undecodable(self, line: int) -> DeviceListError:
        label = _ENCODING_LABELS.get(self.encoding, self.encoding)
        read_as = f" (it was read as {label}, the encoding its first lines are in)" if self.encoding in _LEGACY_ENCODINGS else ""
        return DeviceListError(
            f"line {line} of {self._subject} is not {label} text{read_as}: save the list as "
            '"CSV UTF-8" (in Excel: Save As, CSV UTF-8) or as UTF-8 text'
        )


def _detect_encoding(window: bytes) -> str:
    """The encoding of a file without a BOM, from ``window``: bytes from its first non-ASCII byte on.

    UTF-8 when the window decodes as UTF-8, or when a whole line of it did before the first bad byte
    (a file of mixed encodings is refused at that byte, not read in a third one); otherwise the
    legacy encoding charset-normalizer finds likeliest among :data:`_LEGACY_ENCODINGS`, UTF-8 (and so
    a refusal) when none fits. The window is a function of the file's bytes alone, so the answer is
    the same however they arrive; the whole file must then decode in it.
    """
    try:
        codecs.getincrementaldecoder("utf-8")().decode(window)
        return "utf-8"
    except UnicodeDecodeError as exc:
        if _NEWLINE_RE.search(window[: exc.start].decode("utf-8", "replace")):
            return "utf-8"
    from charset_normalizer import from_bytes  # only for the rare file that needs it

    end = max(window.rfind(b"\n"), window.rfind(b"\r"))
    sample = window[: end + 1] if end > 0 else window  # whole lines, no character cut in two
    best = from_bytes(sample, cp_isolation=list(_LEGACY_ENCODINGS)).best()
    return best.encoding if best is not None and best.encoding in _LEGACY_ENCODINGS else "utf-8"


def _utf16_without_bom(head: bytes) -> str | None:
    """"utf-16-le" or "utf-16-be" when ``head`` reads as UTF-16 without a BOM, else None.

    A list is mostly ASCII (names, delimiters, digits), whose high byte is zero: so many zero bytes
    at odd positions and few at even ones is UTF-16-LE, the other way round UTF-16-BE. Chinese or
    Japanese characters in between only lower the share. What decodes to control characters (NUL
    pairs, escapes) is binary data after all.
    """
    pairs = len(head) // 2
    if pairs < 4:
        return None
    head = head[: 2 * pairs]
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if odd * 10 > pairs * 3 and even * 10 < pairs:
        encoding = "utf-16-le"
    elif even * 10 > pairs * 3 and odd * 10 < pairs:
        encoding = "utf-16-be"
    else:
        return None
    text = head.decode(encoding, "replace")
    if _CONTROL_RE.search(text) or "\ufffd" in text[:-1]:  # the last may be half a surrogate pair
        return None
    return encoding


def _read_lines(reader: _LineReader, subject: _Subject, keep: int, product_key: str | None = None) -> DeviceList:
    collector = _Collector(keep)
    batches = iter(reader)
    # Blank lines, empty rows and comments may come before the header or the first name.
    first, line_no, only_comments, empty_rows, rest = "", 0, False, False, []
    for lines in batches:
        if not "".join(lines).strip():  # a batch of blank lines: no line of it can be the first
            continue
        for index, raw in enumerate(lines):
            first = raw.strip()
            if first and first[0] in ",;" and _EMPTY_ROW_RE.fullmatch(first):
                empty_rows = True
                continue
            if first and not first.startswith("#"):
                line_no = reader.count - len(lines) + index + 1
                rest = lines[index + 1 :]
                break
            only_comments = only_comments or bool(first)
        else:
            continue
        break
    else:
        if only_comments:
            raise DeviceListError(f"{subject} has no device names, only comments")
        if empty_rows:
            raise DeviceListError(
                f"{subject} has no DeviceName column, only empty rows: put the device names in a column "
                'titled "DeviceName" (and nicknames in "DeviceNickname"), or list one name a line'
            )
        raise DeviceListError(f"{subject} is empty")
    more = chain((rest,), batches)

    delimiter, cells = _sniff_header(first, subject)
    keys = [_header_key(c) if c else "" for c in cells]
    if _NAME_HEADER in keys:
        name_at = keys.index(_NAME_HEADER)
        nick_at = next((keys.index(k) for k in _NICK_HEADERS if k in keys), None)
        product = (keys.index(_PRODUCT_HEADER), product_key) if product_key and _PRODUCT_HEADER in keys else None
        if delimiter is None:
            _read_one_a_line(more, line_no + 1, collector, comments=False)
        else:
            _read_csv_rows(more, line_no + 1, collector, delimiter, name_at, nick_at, product)
        return collector.result(reader.count, "csv", f"{subject} has a header but no device names")
    if delimiter is not None or keys[0] in _NICK_HEADERS:
        found = ", ".join(_shown(c.strip(), 40) for c in islice((c for c in cells if c.strip()), 5))
        has = f" (the first line has {found})" if found else ""
        raise DeviceListError(
            f"{subject} has no DeviceName column{has}: put the device names "
            'in a column titled "DeviceName" (and nicknames in "DeviceNickname"), or list one name a line'
        )
    # One name a line without a header: this first line is a name already.
    if keys[0] in _TITLE_WORDS:
        reason = 'looks like a column title: title the column "DeviceName" or delete the line'
        collector.reject(first, reason, line_no)
    else:
        collector.add(_unquote(first), None, line_no)
    _read_one_a_line(more, line_no + 1, collector, comments=True)
    return collector.result(reader.count, "text", f"{subject} has no device names")


def _sniff_header(line: str, subject: _Subject) -> tuple[str | None, list[str]]:
    """The delimiter and the cells of the first line; None when it has no delimiter at all."""
    present = [d for d in _DELIMITERS if d in line]
    for d in present:
        if line.count(d) >= MAX_COLUMNS:
            raise DeviceListError(
                f"the first line of {subject} has {line.count(d) + 1:,} columns; a device list may have "
                f"{MAX_COLUMNS:,} at most: keep the DeviceName and DeviceNickname columns and delete the empty ones"
            )
    split = {d: _split(line, d) for d in present}
    for d, cells in split.items():
        if _NAME_HEADER in (_header_key(c) for c in cells):
            return d, cells
    if not present:
        return None, [line]
    busiest = max(present, key=line.count)
    return busiest, split[busiest]


def _header_key(cell: str) -> str:
    return re.sub(r"[\s_\-]", "", cell).lower()


def _split(line: str, delimiter: str) -> list[str]:
    if '"' not in line:
        return line.split(delimiter)
    feeder, reader = _readers(delimiter)
    feeder.line = line
    try:
        return next(reader)
    except csv.Error:  # a quoted value over the csv module's field size limit
        return line.split(delimiter)
    finally:
        feeder.line = None


class _Feeder:
    """The lines of one csv reader, given one at a time: a reader made once serves every row that
    needs one (making a reader costs more than reading a short row with it)."""

    line: str | None = None

    def __iter__(self) -> _Feeder:
        return self

    def __next__(self) -> str:
        line, self.line = self.line, None
        if line is None:
            raise StopIteration
        return line


_READERS = threading.local()


def _readers(delimiter: str) -> tuple[_Feeder, Any]:
    """This thread's reusable csv reader for ``delimiter``, with its feeder."""
    cache: dict[str, tuple[_Feeder, Any]] = _READERS.__dict__.setdefault("by_delimiter", {})
    if delimiter not in cache:
        feeder = _Feeder()
        cache[delimiter] = feeder, csv.reader(feeder, delimiter=delimiter, skipinitialspace=True, strict=False)
    return cache[delimiter]


def _shown(value: str, limit: int) -> str:
    """``repr(value)``, cut to about ``limit`` characters of the value."""
    return repr(value) if len(value) <= limit else repr(value[: limit - 1] + "…")


def _unquote(value: str) -> str:
    """``"name"`` as a spreadsheet quotes a lone value, without the quotes."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1].replace('""', '"').strip()
    return value


# The fast paths below check a whole batch of lines with one regular expression, and fall back to
# going line by line (the reference behaviour) for a batch with anything unusual in it: a bad name,
# a repeat, a quote, whitespace other than spaces and tabs, a header word. They only ever accept
# lines the line-by-line code would accept the same way.
_PLAIN_NAMES_RE = re.compile(rf"(?:{_NAME_RE.pattern}\n)*{_NAME_RE.pattern}")
_ONE_A_LINE_RE = re.compile(rf"^[ \t]*(?:({_NAME_RE.pattern})[ \t]*|(?:[,;][ \t,;]*)?)$", re.M)
# Text in which a line the patterns above do not match cannot become a name once stripped or unquoted:
# no quote, and no whitespace but spaces and tabs (str.strip() would take it away).
_ODD_SPACES = "".join(c for c in map(chr, range(0x3001)) if c.isspace() and c not in " \t\n")
_ONLY_COUNTED_RE = re.compile(f'[^"{_ODD_SPACES}]*')
_ONE_A_LINE_COMMENTS_RE = re.compile(rf"^[ \t]*(?:({_NAME_RE.pattern})[ \t]*|#.*|(?:[,;][ \t,;]*)?)$", re.M)


def _read_one_a_line(
    batches: Iterable[list[str]], line_no: int, collector: _Collector, *, comments: bool
) -> None:
    pattern = _ONE_A_LINE_COMMENTS_RE if comments else _ONE_A_LINE_RE
    for lines in batches:
        start, line_no = line_no, line_no + len(lines)
        joined = "\n".join(lines)
        if comments and joined[:1] == "#" and joined.count("\n#") == len(lines) - 1:
            continue  # every line a comment
        if _NAME_HEADER not in joined.lower():
            # Most often every line is a name and nothing else: then the lines are the names.
            names = lines if _PLAIN_NAMES_RE.fullmatch(joined) else pattern.findall(joined)
            if len(names) == len(lines):
                if "" not in names:
                    if collector.extend(names, None, range(start, line_no)):
                        continue
                    if not collector.room() and collector.repeats_only(names):
                        continue
                elif not any(names):  # blank lines and comments only
                    continue
                else:
                    kept = [(n, i) for i, n in enumerate(names, start) if n]
                    if collector.extend([n for n, _ in kept], None, (i for _, i in kept)):
                        continue
            elif not collector.room() and _ONLY_COUNTED_RE.fullmatch(joined):
                # Past the rejections kept in detail, a batch of junk (lines the pattern did not
                # match) and repeats is only counted.
                named = [n for n in names if n]
                if collector.repeats_only(named):
                    collector.rejected_count += len(lines) - len(names)
                    continue
        add = collector.add
        counting = not collector.room()  # past the rejections kept in detail: a bad line is counted
        for number, raw in enumerate(lines, start):
            value = raw.strip()
            if not value or (comments and value[0] == "#"):
                continue
            if value[0] in ",;" and _EMPTY_ROW_RE.fullmatch(value):
                continue
            if value[0] == '"':
                value = _unquote(value)
            if counting and _NAME_RE.fullmatch(value) is None:
                collector.rejected_count += 1
                continue
            add(value, None, number)


_SAFE_NICKNAME_LENGTHS = frozenset({0, *range(NICKNAME_MIN, NICKNAME_MAX // 2 + 1)})


def _csv_row_pattern(delimiter: str, name_at: int, nick_at: int | None) -> re.Pattern[str]:
    d = re.escape(delimiter)
    fields = []
    for at in range(max(name_at, -1 if nick_at is None else nick_at) + 1):
        if at == name_at:
            fields.append(rf"[ \t]*(?P<name>{_NAME_RE.pattern})[ \t]*")
        elif at == nick_at:
            fields.append(rf"[ \t]*(?P<nick>{_NICK_CLASS}{{0,{NICKNAME_MAX}}})[ \t]*")
        else:
            fields.append(rf"[^{d}\n]*")
    row = d.join(fields) + rf"(?:{d}[^\n]*)?"
    return re.compile(rf"^(?:{row}|[ \t{d}]*)$", re.M)


def _read_csv_rows(
    batches: Iterable[list[str]],
    line_no: int,
    collector: _Collector,
    delimiter: str,
    name_at: int,
    nick_at: int | None,
    product: tuple[int, str] | None = None,
) -> None:
    """``product``: the ProductKey column and the product the list is for (rows are then read one
    by one, each one's product checked)."""
    last = max(name_at, -1 if nick_at is None else nick_at)
    pattern = _csv_row_pattern(delimiter, name_at, nick_at) if last < _FAST_COLUMNS and product is None else None
    nick_first = nick_at is not None and nick_at < name_at
    rows = _CsvRows(collector, delimiter, name_at, nick_at, product)
    for lines in batches:
        start, line_no = line_no, line_no + len(lines)
        if sum(map(len, lines)) >= MAX_COLUMNS and any(raw.count(delimiter) >= MAX_COLUMNS for raw in lines):
            _read_wide_batch(lines, start, rows, collector, delimiter)
            continue
        if pattern is not None and not rows.open:
            if _csv_batch(lines, start, collector, pattern, nick_at is not None, nick_first):
                continue
            if not collector.room() and _csv_junk(lines, collector, pattern, nick_at is not None, nick_first):
                continue
        rows.feed(lines, start)
    rows.finish()


def _read_wide_batch(lines: list[str], start: int, rows: _CsvRows, collector: _Collector, delimiter: str) -> None:
    """A batch with a line of :data:`MAX_COLUMNS` columns or more: that line is rejected without
    being cut into cells (a quoted row left open before it ends there), the others read as rows."""
    done = 0
    for index, raw in enumerate(lines):
        if raw.count(delimiter) < MAX_COLUMNS:
            continue
        rows.feed(lines[done:index], start + done)
        rows.finish()
        reason = f"{raw.count(delimiter) + 1:,} columns: a row may have {MAX_COLUMNS:,} at most"
        collector.reject(raw.strip(), reason, start + index)
        done = index + 1
    rows.feed(lines[done:], start + done)


#: Lines a quoted cell may run over before its opening quote is taken for one never closed.
_QUOTED_LINES_MAX = 100
_LINE_BREAK_REASON = "a line break inside quotes (lines {} to {}): a name or nickname cannot span lines"
_NEVER_CLOSED_REASON = 'a quote (") opened on this line is never closed: close it or delete it'


def _csv_line_patterns(delimiter: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """Patterns whose fullmatch tells, as the csv module reads (skipinitialspace, not strict), that
    rows are complete at the end of their lines: for a line that starts a row, for a line that
    starts inside a quoted cell, and for lines joined with "\\n". A row that is not complete at the
    end of its line ends inside quotes."""
    d = re.escape(delimiter)
    # Every repetition is possessive (*+): each can only end where the next part begins, so giving
    # characters back could never make a match; and without it a line of quotes backtracks.
    after_quote = rf'"(?:[^"{d}\n][^{d}\n]*+)?'  # the closing quote; anything after it is plain text
    cell = rf' *+(?:"(?:[^"\n]++|"")*+{after_quote}|[^ "{d}\n][^{d}\n]*+)?'
    row = rf"{cell}(?:{d}{cell})*+"
    closing = rf'(?:[^"\n]++|"")*+{after_quote}(?:{d}{cell})*+'
    return re.compile(row), re.compile(closing), re.compile(rf"(?:{row}\n)*+{row}")


class _CsvRows:
    """CSV rows line by line (the reference behaviour the fast path must match).

    A quoted cell may run over line breaks: its row is read from all its physical lines and counted
    at the first. A name or nickname with a line break in it is rejected; a line break in another
    column is allowed. A quote still open after :data:`_QUOTED_LINES_MAX` lines, or at the end of
    the file, rejects the line that opened it, and the lines after it are read as rows again.
    """

    def __init__(
        self, collector: _Collector, delimiter: str, name_at: int, nick_at: int | None, product: tuple[int, str] | None = None
    ) -> None:
        self._product = product
        self._collector = collector
        self._delimiter = delimiter
        self._name_at = name_at
        self._nick_at = nick_at
        self._complete, self._closing, self._all_complete = _csv_line_patterns(delimiter)
        # A row is cut into the cells up to the last one read, and the rest in one piece.
        self._cuts = max(name_at, -1 if nick_at is None else nick_at) + 1
        self._blank = re.compile(rf"[\s{re.escape(delimiter)}]*")
        self.open: list[str] = []  # the lines so far of a row that ends inside quotes
        self._open_at = 0

    def feed(self, lines: list[str], start: int) -> None:
        if not self.open:
            joined = "\n".join(lines)
            if '"' not in joined:
                self._rows(lines, start, [raw.split(self._delimiter, self._cuts) for raw in lines])
                return
            if self._all_complete.fullmatch(joined):  # no quote left open: one csv reader for all
                try:
                    parsed = list(csv.reader(lines, delimiter=self._delimiter, skipinitialspace=True, strict=False))
                except csv.Error:  # a quoted value over the csv module's field size limit: line by line
                    pass
                else:
                    self._rows(lines, start, parsed)
                    return
        for number, raw in enumerate(lines, start):
            if self.open:
                self.open.append(raw)
                if self._closing.fullmatch(raw):
                    self._quoted_row()
                elif len(self.open) > _QUOTED_LINES_MAX:
                    self._never_closed()
            elif '"' in raw and not self._complete.fullmatch(raw):
                self.open, self._open_at = [raw], number
            else:
                self._row(raw, number)

    def finish(self) -> None:
        while self.open:
            self._never_closed()

    def _rows(self, lines: list[str], start: int, parsed: list[list[str]]) -> None:
        """Rows of one line each, with their cells."""
        name_at, nick_at, add = self._name_at, self._nick_at, self._collector.add
        for number, (raw, cells) in enumerate(zip(lines, parsed, strict=True), start):
            name = cells[name_at].strip() if name_at < len(cells) else ""
            nickname = cells[nick_at].strip() if nick_at is not None and nick_at < len(cells) else ""
            if name and self._other_product(cells, name, number):
                continue
            if name:
                add(name, nickname or None, number)
            elif self._filled(cells):
                self._collector.reject(raw.strip(), "no DeviceName on this line", number)

    def _filled(self, cells: list[str]) -> bool:
        """Whether a cell holds anything; the last may be the rest of the row, delimiters and all."""
        return bool(cells) and (any(c.strip() for c in cells[:-1]) or not self._blank.fullmatch(cells[-1]))

    def _cells(self, row: str) -> tuple[list[str], str, str]:
        cells = row.split(self._delimiter, self._cuts) if '"' not in row else _split(row, self._delimiter)
        name = cells[self._name_at].strip() if self._name_at < len(cells) else ""
        nick_at = self._nick_at
        nickname = cells[nick_at].strip() if nick_at is not None and nick_at < len(cells) else ""
        return cells, name, nickname

    def _other_product(self, cells: list[str], name: str, number: int) -> bool:
        """Reject a row whose ProductKey is another product's; True when it was."""
        if self._product is None:
            return False
        at, product_key = self._product
        named = cells[at].strip() if at < len(cells) else ""
        if not named or named == product_key:
            return False
        self._collector.reject(name, f"the ProductKey column says {named}, not {product_key}: register it with -p {named}", number)
        return True

    def _row(self, raw: str, number: int) -> None:
        cells, name, nickname = self._cells(raw)
        if name and self._other_product(cells, name, number):
            return
        if name:
            self._collector.add(name, nickname or None, number)
        elif self._filled(cells):
            self._collector.reject(raw.strip(), "no DeviceName on this line", number)

    def _quoted_row(self) -> None:
        lines, first = self.open, self._open_at
        self.open = []
        row = "\n".join(lines)
        cells, name, nickname = self._cells(row)
        if "\n" in name or "\n" in nickname:
            reason = _LINE_BREAK_REASON.format(first, first + len(lines) - 1) if self._collector.room() else ""
            self._collector.reject(name or row.strip(), reason, first)
        else:
            self._row(row, first)

    def _never_closed(self) -> None:
        lines, first = self.open, self._open_at
        self.open = []
        _, name, _ = self._cells(lines[0])
        self._collector.reject(name or lines[0].strip(), _NEVER_CLOSED_REASON, first)
        self.feed(lines[1:], first + 1)


def _csv_junk(lines: list[str], collector: _Collector, pattern: re.Pattern[str], nicks: bool, nick_first: bool) -> bool:
    """Past the rejections kept in detail, count a batch in one go when no row of it can be a
    device: without quotes, odd whitespace or nicknames to compose, a row the pattern does not
    match is a rejected one."""
    joined = "\n".join(lines)
    if not _ONLY_COUNTED_RE.fullmatch(joined) or not (joined.isascii() or unicodedata.is_normalized("NFC", joined)):
        return False
    found = pattern.findall(joined)
    names = [row[nick_first] for row in found] if nicks else found
    if any(names):
        return False
    collector.rejected_count += len(lines) - len(found)
    return True


def _csv_batch(
    lines: list[str],
    start: int,
    collector: _Collector,
    pattern: re.Pattern[str],
    nicks: bool,
    nick_first: bool,
) -> bool:
    """Take a batch of CSV rows in one go when every row is plainly fine; False to go row by row."""
    joined = "\n".join(lines)
    if '"' in joined or _NAME_HEADER in joined.lower():
        return False
    if not joined.isascii() and not unicodedata.is_normalized("NFC", joined):
        return False
    rows = pattern.findall(joined)
    if len(rows) != len(lines):
        return False
    if not nicks:
        names, nicknames = rows, None
    else:
        names, nicks_found = map(list, zip(*rows))
        if nick_first:
            names, nicks_found = nicks_found, names
        # Nicknames of 4 to 32 characters are within the limits however many characters count 2.
        if not set(map(len, nicks_found)) <= _SAFE_NICKNAME_LENGTHS and any(
            not NICKNAME_MIN <= nickname_length(k) <= NICKNAME_MAX for k in nicks_found if k
        ):
            return False
        nicknames = [k or None for k in nicks_found]
    if "" not in names:
        return collector.extend(names, nicknames, range(start, start + len(lines)))
    kept = [i for i, n in enumerate(names) if n]
    return collector.extend(
        [names[i] for i in kept],
        None if nicknames is None else [nicknames[i] for i in kept],
        (start + i for i in kept),
    )


# --- pasted text -----------------------------------------------------------------------------


def parse_pasted(text: str, *, keep_rejected: int = KEEP_REJECTED) -> DeviceList:
    """Check names typed after a command or pasted into a text box.

    Names are separated by spaces, commas, semicolons or new lines; lines starting with ``#`` are
    comments. A rejection names its line, and its item when a line holds several names (only the
    item when everything is on one line). Raises :class:`DeviceListError` when no name is valid.
    """
    lines = _NEWLINE_RE.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    filled = [raw for raw in lines if raw.strip() and not raw.strip().startswith("#")]
    one_line = len(filled) == 1
    collector = _Collector(keep_rejected, pasted=True)
    for line_no, raw in enumerate(lines, 1):
        if raw.strip().startswith("#"):
            continue
        values = [v for v in _PASTE_SEPARATORS.split(raw) if v]
        for item, value in enumerate(values, 1):
            if one_line:
                collector.add(value, None, None, item)
            else:
                collector.add(value, None, line_no, item if len(values) > 1 else None)
    return collector.result(len(lines), "text", "no device names given")
