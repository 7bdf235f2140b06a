"""Log lines that a request cannot forge or leak through.

A request path is logged decoded: ``/x%0AINFO: fake`` would start a line of its own, and a
query string can carry a secret (the Gradio pages' ``session_hash``, which lets whoever holds
it act in that session). :func:`printable` escapes control characters, and
:class:`AccessLogFilter` applies it to uvicorn's access log, dropping the query string.
"""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with every control or line-breaking character written as ``\\xNN``/``\\uNNNN``,
    so it stays on its line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class AccessLogFilter(logging.Filter):
    """For ``uvicorn.access``, whose records' args are (client, method, path with query,
    HTTP version, status): the path loses its query string and every text is
    :func:`printable`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            record.args = (
                printable(str(client)),
                printable(str(method)),
                printable(str(path).split("?", 1)[0]),
                printable(str(version)),
                status,
            )
        return True
