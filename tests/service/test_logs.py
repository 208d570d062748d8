"""JSON log lines: the access fields as keys, from real RPCs; text lines unchanged."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from loramux.service import __main__ as service_main
from loramux.service.logs import JsonFormatter, configure_logging
from loramux.v1 import generation_service_pb2 as gpb


def access_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "loramux.access"]


def test_access_lines_become_json_objects_with_their_fields(server, caplog) -> None:
    caplog.set_level("INFO", logger="loramux.access")
    stopping = gpb.StoppingCriteria(max_new_tokens=3, ignore_eos=True)
    server.generate(text="Prove", adapter="math", stopping=stopping, request_id="json-1")
    server.generate(text="Prove", stopping=stopping, request_id="json-2")  # the bare base model

    first, second = (json.loads(JsonFormatter().format(r)) for r in access_records(caplog))
    assert first["logger"] == "loramux.access" and first["level"] == "INFO" and first["time"].endswith("+00:00")
    assert (first["rpc"], first["request_id"], first["status"], first["adapter"]) == (
        "Generate",
        "json-1",
        "OK",
        "math",
    )
    assert first["completion_tokens"] == 3 and isinstance(first["duration_ms"], float) and first["ttft_ms"] >= 0
    assert second["adapter"] == "" and "adapter=(base)" in second["message"]  # text keeps its spelling
    assert first["message"].startswith("rpc=Generate request_id=json-1 status=OK adapter=math")


def test_exceptions_and_plain_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info=sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed here" and "ValueError: boom" in entry["exception"]


def test_log_format_flag_and_configuration() -> None:
    args = service_main.build_parser().parse_args(["--log-format", "json"])
    assert args.log_format == "json"
    with pytest.raises(SystemExit):
        service_main.build_parser().parse_args(["--log-format", "xml"])
    with pytest.raises(ValueError, match="log format must be one of text, json"):
        configure_logging(level="INFO", log_format="xml")


def test_json_logging_keeps_stderr_pure_json() -> None:
    from transformers.utils import logging as transformers_logging

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        configure_logging(level="WARNING", log_format="json")
        assert isinstance(root.handlers[0].formatter, JsonFormatter) and root.level == logging.WARNING
        assert not transformers_logging.is_progress_bar_enabled()  # tqdm bars are not log lines
    finally:
        transformers_logging.enable_progress_bar()
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
