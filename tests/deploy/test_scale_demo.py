"""The scale-out demo (deploy/scale-demo.sh) run as CI runs it: every check it prints holds.

Hosts are network namespaces when the test runs as root with ``ip`` (CI does), else 127.0.0.x
addresses; the figures land in the demo's JSON, which the test reads back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("moto")
pytest.importorskip("s3fs")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_scale_demo_passes_every_check(tmp_path: Path) -> None:
    out = tmp_path / "scale-demo.json"
    args = [sys.executable, str(REPO / "deploy" / "scale_demo.py"), "--out", str(out)]
    args += ["--work", str(tmp_path / "work")]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=1400)
    assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["checks"] and all(figures["checks"].values()), figures
    assert figures["rankings"]["lost"] == 0
    assert figures["rankings"]["posted"] == figures["rankings"]["counted"]
    assert figures["round"]["ran_on"] == "worker1" and figures["round"]["checkpoint_in_s3"]
    assert done.returncode == 0, done.stdout[-3000:]
