"""The /ops page in a real browser and a real server: log in, see versions, promote, roll back."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from serve.registry import Registry
from serve.store import key, sync_client
from tests.conftest import Server, start_server
from tests.ui.conftest import CHROMIUM, CHROMIUM_ARGS

TOKEN = "ops-page-token"


@pytest.fixture
def server(tiny_model: Path, tmp_path: Path, redis_url: str) -> Iterator[Server]:
    server = start_server(tiny_model, tmp_path, redis_url, env={"LOOPCHAT_ADMIN_TOKEN": TOKEN})
    yield server
    server.stop()


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page()
        browser.close()


def serving(server: Server) -> str:
    return httpx.get(f"{server.url}/health", timeout=10).json()["version"]


@pytest.mark.slow
def test_operator_logs_in_promotes_and_rolls_back(
    server: Server, page: Page, redis_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    client = sync_client(redis_url)
    registry = Registry(client, str(tmp_path / "checkpoints"), tmp_path / "cache")
    v2 = registry.register(tiny_model, "ppo", "v1", {"kl": 0.0123, "reward_mean": 0.5})
    registry.record_gate(v2, {"passed": True, "reasons": []})
    v3 = registry.register(tiny_model, "ppo", "v1", {"kl": 0.9})
    registry.record_gate(v3, {"passed": False, "reasons": ["KL 0.9 over budget 0.2"]})
    registry.set_candidate(v3)
    for n in (1, 2):
        record = {
            "round": f"r{n}",
            "status": "done",
            "rankings_new": 64 * n,
            "rankings_total": 64 * n,
            "rm": {"heldout_accuracy": 0.5 + n / 10},
            "gate": {"kl_to_sft": n / 100, "reward_difference": {"mean": n / 10}},
            "candidate": f"v{n + 1}",
            "promoted": False,
        }
        client.rpush(key("loop", "rounds"), json.dumps(record))
    client.hset(key("loop", "unusable"), mapping={"all_tied": 5})

    page.goto(f"{server.url}/ops")  # the README's link: redirected to the page at /ops/
    assert page.url == f"{server.url}/ops/"
    page.get_by_label("Admin token").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-message")).to_contain_text("wrong admin token", timeout=30_000)
    expect(page.locator("#versions")).to_be_hidden()

    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    table = page.locator("#versions")
    expect(table).to_contain_text("KL 0.9 over budget 0.2", timeout=30_000)
    expect(table).to_contain_text("kl=0.0123")
    expect(page.locator("#aliases")).to_contain_text("live: v1")
    expect(page.locator("#loop")).to_contain_text("since the last round")
    expect(page.locator("#loop")).to_contain_text("5 all tied")
    expect(page.locator("#loop-plot")).to_be_visible()
    expect(page.locator("#ab")).to_contain_text("Mixed rankings")
    expect(page.locator("#ab-plot")).to_be_visible()

    # The failed candidate is not preselected; chosen, it is refused without "force".
    expect(page.locator("#promote-version input")).to_have_value("")
    page.get_by_role("button", name="Promote").click()
    expect(page.locator("#message")).to_contain_text("Choose a version", timeout=30_000)
    page.locator("#promote-version input").click()
    page.get_by_role("option", name=v3, exact=True).click()
    page.get_by_role("button", name="Promote").click()
    expect(page.locator("#message")).to_contain_text("failed its gate", timeout=30_000)
    assert registry.alias("live") == "v1"

    page.locator("#promote-version input").click()
    page.get_by_role("option", name=v2, exact=True).click()
    page.get_by_label("Reason (kept in the history)").fill("better rankings")
    page.get_by_role("button", name="Promote").click()
    expect(page.locator("#message")).to_contain_text(f"Promoted {v2}", timeout=30_000)
    expect(page.locator("#aliases")).to_contain_text(f"live: {v2}")
    assert registry.alias("live") == v2
    assert registry.history()[-1] | {"time": 0} == {
        "time": 0,
        "action": "promote",
        "version": v2,
        "from": "v1",
        "by": "ops-page@127.0.0.1",
        "reason": "better rankings",
        "forced": False,
    }
    deadline = time.monotonic() + 30
    while serving(server) != v2:  # the server follows the alias it just changed
        assert time.monotonic() < deadline
        time.sleep(0.1)
    expect(page.locator("#history")).to_contain_text("better rankings")

    page.get_by_role("button", name="Roll back").click()
    expect(page.locator("#message")).to_contain_text("live is now v1", timeout=30_000)
    assert registry.alias("live") == "v1"
    expect(page.locator("#aliases")).to_contain_text(re.compile(r"live: v1"))
    expect(page.locator("#aliases")).to_contain_text("pinned by ops-page@127.0.0.1")
    page.get_by_role("button", name="Unpin").click()
    expect(page.locator("#message")).to_contain_text("Unpinned", timeout=30_000)
    assert registry.pin() is None and registry.history()[-1]["action"] == "unpin"
