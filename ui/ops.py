"""The operator page at ``/ops``: checkpoints, promote / rollback / unpin, the learning loop's
curves and the leaderboard of versions from blind A/B in the rankings.

It reaches state only through :class:`serve.admin.AdminService` (what ``/admin/*`` calls), so
the page and the API cannot disagree about what a promotion is. Nothing shows before the admin
token is entered; the token is checked again on every action, so a session opened before the
token changed stops working.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gradio as gr
from fastapi import FastAPI
from matplotlib.figure import Figure

from serve.admin import AdminAuthError, AdminService, LoginThrottle
from serve.registry import RegistryError
from ui.guards import lock_down

TABLE_HEADERS = ["version", "kind", "parent", "created", "alias", "gate", "gate reasons", "metrics"]
# (title, where in a round record) of each curve, one panel per entry.
CURVES: list[tuple[str, Callable[[dict], Any]]] = [
    (
        "reward vs live (gate)",
        lambda r: ((r.get("gate") or {}).get("reward_difference") or {}).get("mean"),
    ),
    ("KL to SFT (gate)", lambda r: (r.get("gate") or {}).get("kl_to_sft")),
    ("reward-model held-out accuracy", lambda r: (r.get("rm") or {}).get("heldout_accuracy")),
    ("new rankings", lambda r: r.get("rankings_new")),
]


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def versions_table(state: dict[str, Any]) -> list[list[str]]:
    """One row per version, newest first, with its alias, gate verdict and metrics."""
    marks = {state[a]: a for a in ("previous", "candidate", "live") if state.get(a)}
    rows = []
    for v in reversed(state["versions"]):
        gate = v.get("gate")
        rows.append(
            [
                v["version"],
                v["kind"],
                v["parent"] or "",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["created_at"])),
                marks.get(v["version"], ""),
                "" if gate is None else ("passed" if gate["passed"] else "FAILED"),
                "" if gate is None else "; ".join(map(str, gate.get("reasons") or [])),
                ", ".join(f"{k}={_number(x)}" for k, x in sorted(v["metrics"].items())),
            ]
        )
    return rows


def preselected(state: dict[str, Any]) -> str | None:
    """The version the promote box offers first: the candidate, only if its gate passed (a
    failed one stays listed, but promoting it is a deliberate, forced choice)."""
    gates = {v["version"]: v["gate"] for v in state["versions"]}
    gate = gates.get(state["candidate"])
    return state["candidate"] if gate and gate["passed"] else None


def loop_figure(rounds: list[dict]) -> Figure:
    """Reward, KL, reward-model accuracy and new rankings for each completed round."""
    done = [r for r in rounds if r.get("status") == "done"]
    fig = Figure(figsize=(4 * len(CURVES), 3))  # no pyplot: no global state, no GUI backend
    axes = fig.subplots(1, len(CURVES), squeeze=False)
    for ax, (title, pick) in zip(axes[0], CURVES, strict=True):
        points = [(i, pick(r)) for i, r in enumerate(done, 1) if pick(r) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def leaderboard_figure(board: dict[str, Any]) -> Figure:
    """Bradley–Terry strengths with their 95% intervals, and the candidate's win rate against
    live with its always-valid 95% band as the mixed rankings came in."""
    fig = Figure(figsize=(10, 3))
    strengths, test = fig.subplots(1, 2, squeeze=True)
    rows = [r for r in board["versions"] if r["strength"] is not None]
    for y, row in enumerate(reversed(rows)):
        low, high = row["interval"]
        strengths.errorbar(
            row["strength"], y, xerr=[[row["strength"] - low], [high - row["strength"]]],
            fmt="o", capsize=3, color="tab:green" if row["version"] == board["live"] else None,
        )  # fmt: skip
    strengths.set_yticks(range(len(rows)), [r["version"] for r in reversed(rows)])
    strengths.axvline(0, color="grey", lw=0.8)
    strengths.set_title(f"strength vs live ({board['live']}), log-odds, 95%", fontsize=10)
    trace = (board.get("test") or {}).get("trace")
    if trace and trace["rankings"]:
        test.fill_between(trace["rankings"], trace["low"], trace["high"], alpha=0.3)
        test.plot(trace["rankings"], trace["win_rate"], marker=".")
        test.axvline(board["test"]["min_rankings"], color="grey", ls=":", lw=0.8)
    test.axhline(0.5, color="black", lw=0.8)
    test.set_ylim(0, 1)
    test.set_xlabel("mixed rankings")
    candidate = (board.get("test") or {}).get("candidate") or "no candidate in mixed slates"
    test.set_title(f"win rate of {candidate} vs live", fontsize=10)
    for ax in (strengths, test):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def leaderboard_summary(board: dict[str, Any]) -> str:
    """The A/B test in one paragraph, and the last decision."""
    test = board.get("test")
    lines = [f"**Mixed rankings:** {board['mixed_rankings']}"]
    if test:
        rate = "—" if test["win_rate"] is None else f"{test['win_rate']:.3f}"
        lines.append(
            f"**A/B test:** {test['candidate']} vs {test['live']}: win rate {rate} "
            f"(95% [{test['interval'][0]:.3f}, {test['interval'][1]:.3f}]) over "
            f"{test['rankings']} mixed rankings → **{test['action']}** ({test['reason']})"
        )
    if board["decisions"]:
        last = board["decisions"][-1]
        lines.append(
            f"**Last A/B decision:** {last['action']} {last['candidate']}: {last['summary']}"
        )
    return "\n\n".join(lines)


def loop_summary(loop: dict[str, Any]) -> str:
    last = loop["rounds"][-1] if loop["rounds"] else None
    lines = [
        f"**Rankings:** {loop['rankings_total']} in total, {loop['rankings_since_last_round']} "
        f"since the last round; next round in {loop['next_round_in']} "
        f"(every {loop['round_every']}).",
        f"**Auto-promote:** {'on' if loop['auto_promote'] else 'off'} · "
        f"**round running:** {'yes' if loop['round_running'] else 'no'} · "
        f"**learner:** {loop['learner']}",
        "**Rankings that order nothing** (stored, not trainable): "
        + (
            ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in unusable.items())
            if (unusable := loop["rankings_unusable"])
            else "none"
        ),
    ]
    if last:
        outcome = last.get("error") or (
            f"candidate {last.get('candidate')}, "
            f"{'promoted' if last.get('promoted') else 'not promoted'}"
        )
        lines.append(f"**Last round** `{last['round']}` ({last['status']}): {outcome}")
    return "\n\n".join(lines)


def history_rows(history: list[dict]) -> list[list[str]]:
    return [
        [
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"])),
            h["action"] + (" (forced)" if h.get("forced") else ""),
            h["version"],
            h["from"] or "",
            h["by"],
            h["reason"],
        ]
        for h in reversed(history)
    ]


def build_ops_page(get_admin: Callable[[], AdminService], throttle: LoginThrottle) -> gr.Blocks:
    """The page; ``get_admin`` returns the service of the running app (resolved per call, so
    the page can be built before the app's lifespan has created the registry); ``throttle``
    counts wrong tokens per address, with the /admin API's."""

    def snapshot(admin: AdminService) -> tuple:
        state = admin.checkpoints()
        loop = admin.loop_status()
        policies = [v["version"] for v in state["versions"] if v["kind"] != "reward"]
        aliases = f"**live:** {state['live']} · **previous:** {state['previous'] or '—'} · " + (
            f"**candidate:** {state['candidate'] or '—'}"
        )
        if pin := state["pin"]:
            aliases += f" · **pinned** by {pin['by']}'s rollback (auto-promote waits)"
        board = admin.leaderboard()
        return (
            aliases,
            versions_table(state),
            gr.update(choices=list(reversed(policies)), value=preselected(state)),
            loop_summary(loop),
            loop_figure(loop["rounds"]),
            leaderboard_summary(board),
            leaderboard_figure(board),
            history_rows(admin.history()),
        )

    def unchanged() -> tuple:
        return (gr.update(),) * len(shown)  # `shown` is defined with the components below

    def address(request: gr.Request) -> str:
        return request.client.host if request.client else "unknown"

    def login(token: str, request: gr.Request) -> tuple:
        admin = get_admin()
        try:
            throttle.check(admin.settings.admin_token, token, address(request))
        except AdminAuthError as exc:
            return ("", gr.update(), gr.update(), f"**{exc}**", *unchanged())
        return (token, gr.update(visible=False), gr.update(visible=True), "", *snapshot(admin))

    def act(token: str, request: gr.Request, action: Callable[[AdminService], str]) -> tuple:
        """Run ``action`` as the operator; its outcome (or why it was refused) is the message.

        Errors are shown as the message rather than raised, so the page stays usable.
        """
        admin = get_admin()
        try:
            throttle.check(admin.settings.admin_token, token, address(request))
        except AdminAuthError as exc:
            return (f"**{exc}**", *unchanged())
        try:
            outcome = action(admin)
        except RegistryError as exc:
            outcome = f"**Refused:** {exc}"
        return (outcome, *snapshot(admin))

    def refresh(token: str, request: gr.Request) -> tuple:
        return act(token, request, lambda admin: "")

    def operator(request: gr.Request) -> str:
        """Who acts, for the history: the page and the browser's address."""
        return f"ops-page@{address(request)}"

    def promote(
        token: str, version: str | None, reason: str, force: bool, request: gr.Request
    ) -> tuple:
        def run(admin: AdminService) -> str:
            if not version:
                return "**Choose a version to promote.**"
            state = admin.promote(version, by=operator(request), reason=reason, force=force)
            return f"Promoted {version}: live is now {state['live']}."

        return act(token, request, run)

    def rollback(token: str, reason: str, request: gr.Request) -> tuple:
        def run(admin: AdminService) -> str:
            state = admin.rollback(by=operator(request), reason=reason)
            return f"Rolled back: live is now {state['live']}."

        return act(token, request, run)

    def unpin(token: str, reason: str, request: gr.Request) -> tuple:
        def run(admin: AdminService) -> str:
            admin.unpin(by=operator(request), reason=reason)
            return "Unpinned: auto-promote may promote a passing candidate again."

        return act(token, request, run)

    with gr.Blocks(title="loopchat · operator") as page:
        token_state = gr.State("")
        gr.Markdown("# loopchat · operator")
        with gr.Column(visible=True) as login_box:
            token_box = gr.Textbox(label="Admin token", type="password", elem_id="admin-token")
            login_button = gr.Button("Log in", variant="primary", elem_id="login")
            login_message = gr.Markdown(elem_id="login-message")
        with gr.Column(visible=False) as panel:
            aliases = gr.Markdown(elem_id="aliases")
            message = gr.Markdown(elem_id="message")
            table = gr.Dataframe(
                headers=TABLE_HEADERS, interactive=False, label="Versions", elem_id="versions"
            )
            with gr.Row():
                version = gr.Dropdown(label="Version", choices=[], elem_id="promote-version")
                reason = gr.Textbox(label="Reason (kept in the history)", elem_id="reason")
                force = gr.Checkbox(
                    label="Force (ignore a failed or missing gate; needs a reason)",
                    elem_id="force",
                )
            with gr.Row():
                promote_button = gr.Button("Promote", variant="primary", elem_id="promote")
                rollback_button = gr.Button("Roll back", variant="stop", elem_id="rollback")
                unpin_button = gr.Button("Unpin", elem_id="unpin")
                refresh_button = gr.Button("Refresh", elem_id="refresh")
            loop_text = gr.Markdown(elem_id="loop")
            plot = gr.Plot(label="Per round", elem_id="loop-plot")
            ab_text = gr.Markdown(elem_id="ab")
            ab_plot = gr.Plot(label="Leaderboard (blind A/B in the rankings)", elem_id="ab-plot")
            history = gr.Dataframe(
                headers=["time", "action", "version", "from", "by", "reason"],
                interactive=False,
                label="Live history",
                elem_id="history",
            )
        shown = [aliases, table, version, loop_text, plot, ab_text, ab_plot, history]
        entered = [token_state, login_box, panel, login_message, *shown]
        login_button.click(login, [token_box], entered)
        token_box.submit(login, [token_box], entered)
        refresh_button.click(refresh, [token_state], [message, *shown])
        promote_button.click(promote, [token_state, version, reason, force], [message, *shown])
        rollback_button.click(rollback, [token_state, reason], [message, *shown])
        unpin_button.click(unpin, [token_state, reason], [message, *shown])
    return page


def mount_ops(app: FastAPI) -> None:
    """Mount the page at ``/ops`` on ``app``."""

    def get_admin() -> AdminService:
        return AdminService(app.state.registry, app.state.settings)

    page = build_ops_page(get_admin, app.state.login_throttle)
    lock_down(app, "/ops")
    gr.mount_gradio_app(app, page, path="/ops", ssr_mode=False)
