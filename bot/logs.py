"""Log set-up: levels by command and ``-v``, lines of text or one JSON object a line.

``iotreg serve`` logs at INFO what an operator follows: each request transition (from the store),
each failed IoT Platform or Slack call, each refused HTTP request, the Socket Mode connection.
Libraries stay at WARNING unless asked (``-v``: iotreg at DEBUG, libraries at INFO; ``-vv``:
everything at DEBUG), and the scheduler's per-job chatter stays at WARNING below ``-vv``.

With ``IOTREG_LOG_FORMAT=json`` each record is one JSON object: ``time``, ``level``, ``logger``,
``message``, the fields the record was given (``request_id``, ``product``, ``state``, ``action``,
``method``, ``outcome``, …) and, for an error, ``traceback``. Secrets are never logged: settings
hold them out of their ``repr``, and no log call is given one.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(verbose: int = 0, *, serving: bool = False, json_format: bool = False) -> None:
    """Set the root handler and the levels, replacing an earlier set-up of ours; like
    ``logging.basicConfig``, leave alone a process whose logging someone else set up (a test run)."""
    root = logging.getLogger()
    if any(not getattr(h, "iotreg", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.iotreg = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)
    ours = logging.DEBUG if verbose >= 1 else logging.INFO if serving else logging.WARNING
    logging.getLogger("bot").setLevel(ours)
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
