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
MAX_EXAMPLES = 50
OPTIONS = [
    # every check: no 5xx; every status, content type, header and body as documented; invalid
    # data refused; wrong methods 405 with Allow; ...
    "--checks=all",
    # ... but "schema-valid data is accepted": the schema cannot say what depends on the
    # deployment or on two fields at once (n up to LOOPCHAT_MAX_N, the context length,
    # temperature 0 only with n = 1, tools refused with a 400)
    "--exclude-checks=positive_data_acceptance",
    "--phases=examples,coverage,fuzzing",
    f"--max-examples={MAX_EXAMPLES}",
    "--seed=0",
    "--workers=1",
    "--generation-database=none",
    "--request-timeout=60",
    "--report=junit",
    "--no-color",
]


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
                *OPTIONS,
                f"--header=Authorization: Bearer {TOKEN}",
                f"--report-junit-path={junit}",
            ],
            cwd=tmp_path,  # its caches (.schemathesis, .hypothesis) stay out of the checkout
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    suites = ElementTree.parse(junit).getroot()
    assert int(suites.get("tests", "0")) > 0 and int(suites.get("failures", "0")) == 0
    cases = re.search(r"(\d+) generated", run.stdout)
    assert cases and int(cases.group(1)) >= 500, run.stdout[-2000:]  # the figure in the README
    served_5xx = re.findall(r'HTTP/1\.1" 5\d\d', server.log.read_text())
    assert served_5xx == []
