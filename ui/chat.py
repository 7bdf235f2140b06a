"""The chat-and-rank page at ``/chat``, the site's front page: chat, see K answers side by side,
rank them, continue.

Each assistant turn asks for K candidates (1-4) and streams them side by side. With K > 1 the
user orders them best to worst (a rank number per answer, the same number for a tie, or "all
bad", plus an optional comment) and the best one continues the conversation; with K = 1 the
answer joins the chat at once and thumbs up / down rate it.

The page reaches state only through serve's public interface, the app's
:class:`serve.serving.ChatService` and :class:`serve.feedback.FeedbackService`, resolved per
call (the app's lifespan creates them after the page is built). The conversation and the
pending completion live in server-side session state, so a browser can rank only what it was
shown, and the candidates' text always comes from the stored completion.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from serve.feedback import FeedbackService
from serve.identity import client_identity, matching_key
from serve.protocol import ChatCompletionRequest, ErrorResponse, FeedbackRequest
from serve.serving import ChatService
from serve.settings import Settings
from ui.guards import lock_down

PATH = "/chat"
MAX_K = 4
LETTERS = "ABCD"
STREAM_EVERY = 0.05  # seconds between screen updates while answers stream

# On a narrow screen the answers stack, one per line, instead of squeezing side by side.
CSS = "@media (max-width: 640px) { #cands > div { min-width: 100% !important; } }"


class StreamFailed(Exception):
    """The server reported an error inside the answer stream."""


def rank_groups(ranks: list[str | None]) -> list[list[int]] | str:
    """Best-to-worst tie groups from each answer's rank ("1" = best; equal ranks tie), or a
    message naming the answers left unranked. No rank at all is the empty ranking."""
    if not any(ranks):
        return []
    unranked = [LETTERS[i] for i, r in enumerate(ranks) if not r]
    if unranked:
        return f"Give answer {', '.join(unranked)} a rank too (the same number means a tie)."
    return [[i for i, r in enumerate(ranks) if r == level] for level in sorted(set(ranks), key=int)]


def read_sse(event: str, texts: list[str]) -> dict[str, Any] | None:
    """Add one server-sent event of a streamed chat completion to ``texts``; returns the chunk,
    or None for the closing ``[DONE]``."""
    payload = event.removeprefix("data: ").strip()
    if payload == "[DONE]":
        return None
    chunk = json.loads(payload)
    if "error" in chunk:
        raise StreamFailed(chunk["error"]["message"])
    for choice in chunk["choices"]:
        texts[choice["index"]] += choice["delta"].get("content") or ""
    return chunk


def build_chat_page(
    get_chat: Callable[[], ChatService],
    get_feedback: Callable[[], FeedbackService],
    settings: Settings,
) -> gr.Blocks:
    """The page; the getters return the running app's services."""
    k_choices = list(range(1, min(MAX_K, settings.max_n) + 1))

    with gr.Blocks(title="loopchat") as page:
        conversation = gr.State([])  # role/content dicts: what the model is sent
        pending = gr.State(None)  # {"completion_id", "candidates", "k"} awaiting a rating
        user_id = gr.BrowserState(None, storage_key="loopchat-user")

        gr.Markdown(
            "## loopchat\nAsk something. With several answers per turn, rank them (1 = best, "
            "the same number for a tie) and the best one continues the chat. Your rankings "
            "teach the model."
        )
        with gr.Row(equal_height=True):
            k = gr.Radio(
                k_choices, value=min(2, k_choices[-1]), label="Answers per turn", elem_id="k"
            )
            api_key = gr.Textbox(
                label="API key", type="password", visible=bool(settings.api_keys), elem_id="key"
            )
            new_chat = gr.Button("New chat", elem_id="new-chat", min_width=120)
        version = gr.Markdown("", elem_id="version")
        chatbot = gr.Chatbot(elem_id="chat", height=360, feedback_options=None, label="Chat")
        with gr.Row(equal_height=True):
            message = gr.Textbox(
                placeholder="Type a message and press Enter",
                show_label=False,
                autofocus=True,
                max_lines=6,
                elem_id="message",
                scale=5,
            )
            send = gr.Button("Send", variant="primary", elem_id="send", min_width=80)

        columns, answers, ranks = [], [], []
        with gr.Row(visible=False, elem_id="cands") as candidates:
            for i, letter in enumerate(LETTERS[:MAX_K]):
                with gr.Column(min_width=220, elem_id=f"col-{i}") as column:
                    answers.append(
                        gr.Textbox(
                            label=f"Answer {letter}",
                            interactive=False,
                            lines=4,
                            max_lines=14,
                            elem_id=f"cand-{i}",
                        )
                    )
                    ranks.append(gr.Radio([], label=f"Rank of {letter}", elem_id=f"rank-{i}"))
                columns.append(column)
        with gr.Row(visible=False, equal_height=True, elem_id="rank-row") as ranking:
            all_bad = gr.Checkbox(label="All bad", elem_id="all-bad", min_width=100)
            comment = gr.Textbox(
                placeholder="Comment (optional)",
                show_label=False,
                max_length=settings.max_comment_chars,
                elem_id="comment",
                scale=4,
            )
            submit = gr.Button("Submit ranking", variant="primary", elem_id="submit-ranking")
        with gr.Row(visible=False, elem_id="thumbs") as thumbs:
            up = gr.Button("👍 Good answer", elem_id="thumbs-up", min_width=120)
            down = gr.Button("👎 Bad answer", elem_id="thumbs-down", min_width=120)
        status = gr.Markdown("", elem_id="status")

        def identity_of(entered: str | None, request: gr.Request) -> str:
            """Who acts (``serve.identity``): the entered API key's hash, or the browser's
            address when keys are off. A wrong key stops the action."""
            address = request.client.host if request.client else None
            if not settings.api_keys:
                return client_identity(None, address)
            key = matching_key(entered, settings.api_keys) if entered else None
            if key is None:
                raise gr.Error("Enter a valid API key first.")
            return client_identity(key, address)

        def composing(history: list[dict], note: str = "") -> dict:
            """Back to typing: answers and rating controls hidden, the input open."""
            return {
                chatbot: history,
                message: gr.update(interactive=True),
                send: gr.update(interactive=True),
                candidates: gr.update(visible=False),
                ranking: gr.update(visible=False),
                thumbs: gr.update(visible=False),
                status: note,
            }

        async def ask(
            text: str,
            history: list[dict],
            waiting: dict | None,
            n: int,
            uid: str | None,
            entered_key: str | None,
            request: gr.Request,
        ) -> AsyncIterator[dict]:
            """Send the conversation plus ``text`` for ``n`` answers and stream them in."""
            if waiting and waiting["k"] > 1:
                raise gr.Error("Rank the answers above first, or start a new chat.")
            if not text.strip():
                return
            identity = identity_of(entered_key, request)
            asked = [*history, {"role": "user", "content": text}]
            texts = [""] * n
            levels = [str(level) for level in range(1, n + 1)]

            def streamed() -> dict:
                if n == 1:
                    return {chatbot: [*asked, {"role": "assistant", "content": texts[0]}]}
                return dict(zip(answers, texts, strict=False))

            yield {
                **composing(asked),
                **streamed(),
                message: gr.update(value="", interactive=False),
                send: gr.update(interactive=False),
                candidates: gr.update(visible=n > 1),
                pending: None,
                **{column: gr.update(visible=i < n) for i, column in enumerate(columns)},
                **{r: gr.update(choices=levels, value=None) for r in ranks},
                all_bad: False,
                comment: "",
            }
            asking = ChatCompletionRequest(
                model=settings.model_name, messages=asked, n=n, stream=True, user=uid
            )
            result = await get_chat().create_chat_completion(asking, identity)
            if isinstance(result, ErrorResponse):
                yield {**composing(history, f"⚠ {result.error.message}"), message: text}
                return
            chunk: dict[str, Any] = {}
            shown_at = 0.0
            try:
                async with aclosing(result) as events:
                    async for event in events:
                        chunk = read_sse(event, texts) or chunk
                        if time.monotonic() - shown_at > STREAM_EVERY:
                            shown_at = time.monotonic()
                            yield streamed()
            except StreamFailed as exc:
                yield {**composing(history, f"⚠ {exc}"), message: text}
                return

            done = {"completion_id": chunk["id"], "candidates": texts, "k": n}
            answered = {version: f"Answered by model version **{chunk['system_fingerprint']}**"}
            if n == 1:
                history = [*asked, {"role": "assistant", "content": texts[0]}]
                yield {
                    **composing(history, "Rate this answer, or just keep chatting."),
                    **answered,
                    thumbs: gr.update(visible=True),
                    conversation: history,
                    pending: done,
                }
                return
            yield {
                **streamed(),
                **answered,
                ranking: gr.update(visible=True),
                conversation: asked,
                pending: done,
                status: f"Rank the {n} answers: 1 = best; the same number for a tie.",
            }

        async def rate(
            history: list[dict],
            waiting: dict | None,
            groups: list[list[int]],
            bad: bool,
            note: str,
            uid: str | None,
            entered_key: str | None,
            request: gr.Request,
        ) -> dict:
            """Store the rating; after a ranking the best answer continues the conversation."""
            if not waiting:
                raise gr.Error("There is nothing to rate yet.")
            feedback = FeedbackRequest(
                completion_id=waiting["completion_id"],
                ranking=groups,
                all_bad=bad,
                user=uid,
                comment=note.strip() or None,
            )
            result = await get_feedback().submit(feedback, identity_of(entered_key, request))
            if isinstance(result, ErrorResponse):
                raise gr.Error(result.error.message)
            thanks = f"Thanks, saved ({result.pairs} comparison{'s' * (result.pairs != 1)})."
            if waiting["k"] == 1:
                return {**composing(history, thanks), pending: None}
            best = groups[0][0] if groups else 0
            history = [*history, {"role": "assistant", "content": waiting["candidates"][best]}]
            note = f"{thanks} Answer {LETTERS[best]} continues the conversation."
            return {**composing(history, note), conversation: history, pending: None}

        async def submit_ranking(
            history: list[dict],
            waiting: dict | None,
            uid: str | None,
            entered_key: str | None,
            bad: bool,
            note: str,
            rank_a: str | None,
            rank_b: str | None,
            rank_c: str | None,
            rank_d: str | None,
            request: gr.Request,
        ) -> dict:
            given = [rank_a, rank_b, rank_c, rank_d][: waiting["k"] if waiting else 0]
            groups = rank_groups(given)
            if isinstance(groups, str):
                raise gr.Error(groups)
            if not groups and not bad:
                raise gr.Error("Rank the answers, or tick “All bad”.")
            return await rate(history, waiting, groups, bad, note, uid, entered_key, request)

        async def thumbs_up(
            history: list[dict],
            waiting: dict | None,
            uid: str | None,
            entered_key: str | None,
            request: gr.Request,
        ) -> dict:
            return await rate(history, waiting, [[0]], False, "", uid, entered_key, request)

        async def thumbs_down(
            history: list[dict],
            waiting: dict | None,
            uid: str | None,
            entered_key: str | None,
            request: gr.Request,
        ) -> dict:
            return await rate(history, waiting, [], True, "", uid, entered_key, request)

        def start_over() -> dict:
            return {
                **composing([]),
                message: gr.update(value="", interactive=True),
                conversation: [],
                pending: None,
                version: "",
            }

        def ensure_user(uid: str | None) -> str:
            """A stable pseudonymous label per browser, stored in it: the rankings' ``user``
            (a label for stats; limits and dedupe count the server-side identity)."""
            return uid or f"web-{uuid.uuid4().hex[:12]}"

        every = [
            *(chatbot, message, send, candidates, ranking, thumbs, status, version),
            *(conversation, pending, all_bad, comment),
            *columns,
            *answers,
            *ranks,
        ]
        asked_with = [message, conversation, pending, k, user_id, api_key]
        asking = [
            message.submit(ask, asked_with, every),
            send.click(ask, asked_with, every),
        ]
        rated_with = [conversation, pending, user_id, api_key]
        submit.click(submit_ranking, [*rated_with, all_bad, comment, *ranks], every)
        up.click(thumbs_up, rated_with, every)
        down.click(thumbs_down, rated_with, every)
        new_chat.click(start_over, None, every, cancels=asking)
        page.load(ensure_user, user_id, user_id)
    # Every session may generate at once: the engine batches; Gradio's default is one at a time.
    return page.queue(default_concurrency_limit=None)


def mount_chat(app: FastAPI) -> None:
    """Mount the page at ``/chat`` on ``app``, and make it the site's front page: ``GET /``
    redirects there (the page is not mounted at ``/`` itself, where it would receive every
    path the API does not match and answer them with its own 404 instead of OpenAI's)."""
    page = build_chat_page(lambda: app.state.chat, lambda: app.state.feedback, app.state.settings)
    lock_down(app, PATH)
    gr.mount_gradio_app(app, page, path=PATH, ssr_mode=False, css=CSS)

    @app.get("/", include_in_schema=False)
    async def front_page() -> RedirectResponse:
        return RedirectResponse(f"{PATH}/")
