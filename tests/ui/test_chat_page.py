"""The chat page in a real headless Chromium (Debian's), driven by Playwright, on a real server.

The rankings made in the browser are looked up where the learner reads them: the Redis stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page, expect, sync_playwright

from serve.events import FeedbackLog
from serve.store import sync_client
from tests.conftest import TEST_REDIS_URL, Server, start_server
from tests.ui.conftest import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.slow  # starts real processes

ANSWER_TIMEOUT = 90_000  # ms: answers from a tiny model on a shared CPU


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    started = start_server(tiny_model, tmp_path_factory.mktemp("chat-page"), TEST_REDIS_URL)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(server: Server, browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    opened = context.new_page()
    opened.goto(f"{server.url}/")  # the front page leads to the chat page
    assert opened.url == f"{server.url}/chat/"
    expect(opened.locator("#message textarea")).to_be_editable(timeout=30_000)
    yield opened
    context.close()


def events() -> list[dict]:
    return [event for _, event in FeedbackLog(sync_client(TEST_REDIS_URL)).events()]


def ask(page: Page, k: int, text: str) -> None:
    page.locator("#k").get_by_label(str(k), exact=True).check()
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")


def shown_answers(page: Page, k: int) -> list[str]:
    return [page.locator(f"#cand-{i} textarea").input_value() for i in range(k)]


def shown_in_chat(text: str) -> re.Pattern[str]:
    """A pattern the chat's rendering of ``text`` matches: its first letters and digits in order.

    The test model's answers are random bytes; rendered as Markdown, their control characters,
    spaces and markup vanish or change, but the letters and digits stay, in order.
    """
    kept = re.sub(r"[^0-9A-Za-z]", "", text)[:12]
    return re.compile(r"[^0-9A-Za-z]*".join(re.escape(c) for c in kept))


def as_shown(text: str) -> str:
    """What a textarea displays of ``text`` (browsers normalise line breaks to ``\\n``)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def test_ranking_three_answers_stores_that_order_and_the_best_continues(page: Page) -> None:
    before = len(events())
    ask(page, 3, "What is 2 + 3?")
    expect(page.locator("#submit-ranking")).to_be_visible(timeout=ANSWER_TIMEOUT)
    expect(page.locator("#cand-3")).to_be_hidden()
    answers = shown_answers(page, 3)

    # C best, then A, then B.
    for answer, level in [(2, "1"), (0, "2"), (1, "3")]:
        page.locator(f"#rank-{answer}").get_by_label(level, exact=True).check()
    page.locator("#comment textarea").fill("C is clearest")
    page.locator("#submit-ranking").click()
    expect(page.locator("#status")).to_contain_text("Answer C continues", timeout=30_000)

    [event] = events()[before:]
    assert event["ranking"] == [[2], [0], [1]]
    assert [as_shown(text) for text in event["candidates"]] == answers
    assert event["messages"] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert event["comment"] == "C is clearest" and event["all_bad"] is False
    assert event["user"].startswith("web-")
    expect(page.locator("#version")).to_contain_text(event["version"])
    expect(page.locator("#submit-ranking")).to_be_hidden()
    expect(page.locator("#message textarea")).to_be_editable()
    if re.search(r"[0-9A-Za-z]", answers[2]):  # the chosen answer is now the assistant's turn
        expect(page.locator("#chat")).to_contain_text(shown_in_chat(answers[2]))


def test_keyboard_thumbs_ties_and_multi_turn_then_new_chat(page: Page) -> None:
    before = len(events())
    ask(page, 1, "hello")
    thumbs_down = page.locator("#thumbs-down")
    expect(thumbs_down).to_be_visible(timeout=ANSWER_TIMEOUT)
    thumbs_down.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Thanks, saved", timeout=30_000)
    first = events()[before]
    assert (first["ranking"], first["all_bad"], len(first["candidates"])) == ([], True, 1)

    ask(page, 2, "And plus 4?")
    expect(page.locator("#submit-ranking")).to_be_visible(timeout=ANSWER_TIMEOUT)
    expect(page.locator("#message textarea")).not_to_be_editable()  # rank before going on
    for answer in (0, 1):
        page.locator(f"#rank-{answer}").get_by_label("1", exact=True).check()  # a tie
    page.locator("#submit-ranking").press("Enter")
    expect(page.locator("#status")).to_contain_text("0 comparisons", timeout=30_000)
    second = events()[before + 1]
    assert second["ranking"] == [[0, 1]]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == first["candidates"][0]
    assert second["user"] == first["user"]  # one browser, one user

    page.locator("#new-chat").click()
    expect(page.locator("#status")).to_have_text("")
    expect(page.locator("#chat")).not_to_contain_text("And plus 4?")


def test_answers_stack_on_a_narrow_screen(page: Page) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    ask(page, 2, "What is 1 + 1?")
    expect(page.locator("#submit-ranking")).to_be_visible(timeout=ANSWER_TIMEOUT)
    first, second = (page.locator(f"#cand-{i}").bounding_box() for i in (0, 1))
    assert first and second
    assert second["y"] >= first["y"] + first["height"]  # one below the other
    assert first["width"] > 300  # the full width of the phone


def test_front_page_and_ops_lead_to_their_pages(server: Server) -> None:
    front = httpx.get(f"{server.url}/")
    assert front.is_redirect and front.headers["location"] == "/chat/"
    for path, page in [("/", "/chat/"), ("/chat", "/chat/"), ("/ops", "/ops/")]:
        reached = httpx.get(f"{server.url}{path}", follow_redirects=True)
        assert reached.status_code == 200, path
        assert reached.url.path == page and "text/html" in reached.headers["content-type"]


def test_unknown_paths_answer_in_openai_error_shape_beside_the_pages(server: Server) -> None:
    for method, path in [
        ("GET", "/v1/nothing"),
        ("POST", "/v1/chat/nothing"),
        ("GET", "/admin/x"),
        ("POST", "/admin/x/y"),
        ("GET", "/nowhere"),
    ]:
        response = httpx.request(method, f"{server.url}{path}")
        assert response.status_code == 404, path
        assert set(response.json()) == {"error"}
        assert response.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
