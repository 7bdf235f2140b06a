"""Schemathesis fuzzes the API from its own ``/openapi.json``, against a real server process:
no request it can make gets a 5xx or a response that breaks the schema.

Bounded (examples per operation, one worker, a fixed seed) so the run takes about a minute.
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from tests.conftest import TEST_REDIS_URL, start_server

pytestmark = pytest.mark.slow  # starts real processes

TOKEN = "fuzz-admin-token"
MAX_EXAMPLES = 20
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


def test_fuzzing_the_openapi_schema_finds_no_5xx_and_no_schema_breaking_response(
    tiny_model: Path, tmp_path: Path, redis_url: str
) -> None:
    env = {
        "LOOPCHAT_ADMIN_TOKEN": TOKEN,
        "LOOPCHAT_MAX_MODEL_LEN": "64",
        "LOOPCHAT_MAX_TOKENS_DEFAULT": "4",
        "LOOPCHAT_CHAT_RATE": str(10**6),
        "LOOPCHAT_FEEDBACK_RATE": str(10**6),
        "LOOPCHAT_ROUND_EVERY": str(10**9),
    }
    server = start_server(tiny_model, tmp_path / "data", TEST_REDIS_URL, env=env)
    junit = tmp_path / "schemathesis.xml"
    try:
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{server.url}/openapi.json",
                "--checks", ",".join(CHECKS),
                "--phases", "examples,coverage,fuzzing",
                "--max-examples", str(MAX_EXAMPLES),
                "--seed", "0",
                "--workers", "1",
                "--generation-database", "none",
                "--request-timeout", "60",
                "--header", f"Authorization: Bearer {TOKEN}",
                "--report", "junit", "--report-junit-path", str(junit),
                "--no-color",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    suites = ElementTree.parse(junit).getroot()
    assert int(suites.get("tests", "0")) > 0 and int(suites.get("failures", "0")) == 0
    served_5xx = re.findall(r'HTTP/1\.1" 5\d\d', server.log.read_text())
    assert served_5xx == []
