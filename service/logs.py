"""Log output for the service: text lines (default) or one JSON object per line (``--log-format json``).

JSON lines carry ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, plus, for the
``loramux.access`` lines, every access field as its own key (``rpc``, ``request_id``, ``status``,
``adapter`` ("" for the bare base model), token counts, ``duration_ms``, ``ttft_ms``, ``traceparent``), and
``exception`` with the traceback when there is one: log collectors index them without parsing the text.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(*, level: str, log_format: str) -> None:
    """Root logging to stderr in the chosen format (called once, at start-up)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)} (got {log_format!r})")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if log_format == "json":  # transformers' progress bars are not log lines: keep stderr pure JSON
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
