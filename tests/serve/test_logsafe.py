"""Log lines a request cannot split or fill with its secrets."""

from __future__ import annotations

import logging

from serve.logsafe import AccessLogFilter, printable


def test_printable_escapes_every_line_break_and_control_character() -> None:
    assert printable("/a\nb\rc\x00d\x7fe\u2028f\u0085g") == "/a\\nb\\rc\\x00d\\x7fe\\u2028f\\x85g"
    assert printable("/plain/é/path") == "/plain/é/path"


def test_access_log_records_lose_their_query_string_and_control_characters() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", "/x\nINFO: forged?session_hash=abc", "1.1", 200), None,
    )  # fmt: skip
    assert AccessLogFilter().filter(record)
    assert record.getMessage() == '1.2.3.4:5 - "GET /x\\nINFO: forged HTTP/1.1" 200'
