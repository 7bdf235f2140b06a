"""Scale-out demo: loopchat's parts on separate hosts of one machine, checked end to end.

Hosts are Linux network namespaces on one bridge (``ip netns``; run as root). Where those
cannot be made, each host is a process bound to its own 127.0.0.x address instead (the
output says which). Nothing is shared between hosts but the network: each host has its own
data directory, checkpoints live in an S3 server (moto), the hot-swap signal goes through
Redis pub/sub.

    redis (AOF)  s3 (moto)  api1  api2  worker1  [worker2]      client: round-robin over api1/api2

Checked and printed (and written to ``results/scale-demo.json``): rankings posted to either
replica, counted, lost; a learning round on the worker host writing its checkpoint to S3; the
time from a promote to both replicas answering with the new ``system_fingerprint``; failed
requests and lost rankings while a replica is killed mid-traffic; a second worker sharing the
queue with no ranking counted twice. Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parent.parent
BRIDGE, SUBNET = "lcdemo0", "10.77.0"
HOSTS = {"redis": 10, "s3": 11, "api1": 21, "api2": 22, "worker1": 31, "worker2": 32}
ADMIN = "scale-demo-admin"
BUCKET = "loopchat-demo"
STREAM = "loopchat:feedback"  # serve.events.STREAM: the rankings, one entry each
# A round sized for a demo on a busy CPU: the plumbing is the point, not what it learns.
SMALL_LOOP = {
    "max_prompts": 8,
    "ptx_texts": 0,
    "reward": {"epochs": 1, "rankings_per_batch": 16},
    "rloo": {"steps": 2, "prompts_per_step": 4, "k": 2, "response_length": 12},
    "gate": {"prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "require_signal": False},
}


@dataclass
class Network:
    """The hosts: namespaces on a bridge, or 127.0.0.x addresses when namespaces fail."""

    netns: bool
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ip(self, host: str) -> str:
        return f"{SUBNET}.{HOSTS[host]}" if self.netns else f"127.0.0.{HOSTS[host]}"

    @classmethod
    def make(cls, want_netns: bool) -> Network:
        if want_netns:
            try:
                _teardown_netns()
                _sh("ip", "link", "add", BRIDGE, "type", "bridge")
                _sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
                _sh("ip", "link", "set", BRIDGE, "up")
                for host, n in HOSTS.items():
                    ns, veth = f"lc-{host}", f"lcv{n}"
                    _sh("ip", "netns", "add", ns)
                    _sh(
                        "ip",
                        "link",
                        "add",
                        veth,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "eth0",
                        "netns",
                        ns,
                    )
                    _sh("ip", "link", "set", veth, "master", BRIDGE, "up")
                    _sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0")
                    _sh("ip", "-n", ns, "link", "set", "eth0", "up")
                    _sh("ip", "-n", ns, "link", "set", "lo", "up")
                return cls(netns=True)
            except (subprocess.CalledProcessError, FileNotFoundError) as exc:
                print(f"scale-demo: network namespaces unavailable ({exc}); using 127.0.0.x")
                _teardown_netns()
        return cls(netns=False)

    def start(self, host: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        prefix = ["ip", "netns", "exec", f"lc-{host}"] if self.netns else []
        with open(log, "ab") as fh:  # `ip netns exec` execs: the pid is the program's
            proc = subprocess.Popen(prefix + args, env=env, stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.netns:
            _teardown_netns()


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _teardown_netns() -> None:
    for host in HOSTS:
        subprocess.run(["ip", "netns", "del", f"lc-{host}"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def build_model(out: Path) -> Path:
    """A random ``nano`` Llama with a tokenizer trained here (seconds): serving, ranking and
    learning all run on it; what it answers does not matter to this demo."""
    from learn.builtin.presets import new_model
    from learn.builtin.tokenizer import train_tokenizer
    from learn.modeling import save_model

    texts = [f"What is {a} + {b}? It is {a + b}." for a in range(40) for b in range(10)]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    return save_model(new_model("nano", tokenizer, seed=0), tokenizer, out)


def wait_until(what: str, check, timeout_s: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"scale-demo: {what}: process exited ({proc.returncode})")
        try:
            if result := check():
                return result
        except (httpx.HTTPError, redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.3)
    raise SystemExit(f"scale-demo: {what}: not within {timeout_s:.0f} s (last error: {last!r})")


class Client:
    """The users behind a load balancer: chat with n=2 and rank, round-robin over the
    replicas; a request that fails is counted, its replica taken out of the rotation (as a
    balancer's health check would) and the request sent to the next one."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)
        self.http = httpx.Client(timeout=60)
        self.turn = 0
        self.posted = 0  # rankings answered 201
        self.failed = 0  # requests that failed (connection refused/reset, 5xx)
        self.lock = threading.Lock()

    def _next(self) -> str:
        with self.lock:
            self.turn += 1
            return self.urls[self.turn % len(self.urls)]

    def _post(self, path: str, body: dict) -> tuple[httpx.Response, bool]:
        """The first answer below 500, and whether an earlier attempt failed (it may have been
        stored before its replica died: the reply is what was lost)."""
        for attempt in range(4):
            url = self._next()
            try:
                reply = self.http.post(f"{url}{path}", json=body)
                if reply.status_code < 500:
                    return reply, attempt > 0
            except httpx.HTTPError:
                pass
            with self.lock:
                self.failed += 1
                if url in self.urls and len(self.urls) > 1:
                    self.urls.remove(url)
        raise RuntimeError(f"no replica answered {path}")

    def rank_one(self, i: int) -> str:
        """One chat and its ranking (each to whichever replica is next); the version served."""
        chat, _ = self._post(
            "/v1/chat/completions",
            {
                "model": "loopchat",
                "messages": [{"role": "user", "content": f"What is {i % 40} + {i % 7}?"}],
                "n": 2,
                "max_tokens": 8,
                "user": f"u{i % 5}",
            },
        )
        chat = chat.json()
        ranking = [0, 1] if len(chat["choices"][0]["message"]["content"]) % 2 else [1, 0]
        reply, retried = self._post(
            "/v1/feedback",
            {"completion_id": chat["id"], "ranking": ranking, "user": f"u{i % 5}"},
        )
        # A retry answered 409 already_ranked: the attempt whose reply the killed replica lost
        # was stored (once, as the dedupe promises), so the ranking is posted, not refused.
        already = reply.status_code == 409 and reply.json()["error"]["code"] == "already_ranked"
        if reply.status_code == 201 or (retried and already):
            with self.lock:
                self.posted += 1
        return chat["system_fingerprint"]

    def version_of(self, url: str) -> str | None:
        body = {"model": "loopchat", "messages": [{"role": "user", "content": "hi"}], "n": 1}
        reply = self.http.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 2})
        return reply.json()["system_fingerprint"] if reply.status_code == 200 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--round-every", type=int, default=16)
    parser.add_argument("--no-netns", action="store_true", help="use 127.0.0.x addresses")
    parser.add_argument("--work", type=Path, default=REPO / "results" / "scale-demo-work")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "scale-demo.json")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    net = Network.make(want_netns=not args.no_netns and os.geteuid() == 0)
    try:
        figures = run(net, args)
    finally:
        net.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    failed = [name for name, ok in figures["checks"].items() if not ok]
    print(f"scale-demo: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


def run(net: Network, args: argparse.Namespace) -> dict:
    work, py = args.work, sys.executable
    model = build_model(work / "model")
    redis_ip, s3_ip = net.ip("redis"), net.ip("s3")
    redis_url, s3_url = f"redis://{redis_ip}:6379/0", f"http://{s3_ip}:5000"
    (work / "redis").mkdir()
    redis_args = [
        "redis-server",
        "--bind",
        redis_ip,
        "--port",
        "6379",
        "--dir",
        str(work / "redis"),
    ]
    redis_args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    redis_args += ["--protected-mode", "no"]  # reached from other hosts, as a deployed Redis
    net.start("redis", redis_args, dict(os.environ), work / "redis.log")
    net.start(
        "s3",
        [py, "-m", "moto.server", "-H", s3_ip, "-p", "5000"],
        dict(os.environ),
        work / "s3.log",
    )
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    wait_until("redis", r.ping, 30)
    aws = {"AWS_ENDPOINT_URL": s3_url, "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo"}
    aws["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ.update(aws)
    import fsspec

    s3 = fsspec.filesystem("s3", endpoint_url=s3_url)
    wait_until("s3", lambda: s3.mkdir(BUCKET) or True, 60)

    def env(host: str) -> dict[str, str]:
        return {
            **os.environ,
            **aws,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "LOOPCHAT_DATA_DIR": str(work / host),  # no disk shared between hosts
            "LOOPCHAT_REDIS_URL": redis_url,
            "LOOPCHAT_CHECKPOINTS": f"s3://{BUCKET}/checkpoints",
            "LOOPCHAT_ROUND_EVERY": str(args.round_every),
            "LOOPCHAT_AUTO_PROMOTE": "0",
            "LOOPCHAT_AB_SHARE": "0",
            "LOOPCHAT_ADMIN_TOKEN": ADMIN,
            "LOOPCHAT_FEEDBACK_RATE": "100000",
            "LOOPCHAT_MAX_N": "2",
            "LOOPCHAT_LOOP_CONFIG": json.dumps(SMALL_LOOP),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        }

    def api(host: str) -> tuple[str, subprocess.Popen]:
        cmd = [py, "-m", "serve.cli", "up", "--no-worker", "--engine", args.engine]
        cmd += ["--model", str(model), "--host", net.ip(host), "--port", "8000"]
        proc = net.start(host, cmd, env(host), work / f"{host}.log")
        url = f"http://{net.ip(host)}:8000"
        wait_until(
            f"{host} healthy", lambda: httpx.get(f"{url}/health").status_code == 200, 600, proc
        )
        return url, proc

    def worker(host: str) -> subprocess.Popen:
        cmd = [py, "-m", "serve.cli", "worker", "--hostname", f"learn@{host}"]
        return net.start(host, cmd, env(host), work / f"{host}.log")

    started = time.monotonic()
    url1, _ = api("api1")  # bootstraps v1 into S3
    url2, api2 = api("api2")
    worker("worker1")
    client = Client([url1, url2])
    figures: dict = {"hosts": "network namespaces" if net.netns else "127.0.0.x addresses"}
    figures["engine"], figures["round_every"] = args.engine, args.round_every
    figures["startup_s"] = round(time.monotonic() - started, 1)

    # 1. rankings to either replica, counted once; the round they start runs on worker1
    for i in range(args.round_every):
        client.rank_one(i)
    rounds = wait_until("first round", lambda: _done_rounds(r, 1), 900)
    first = rounds[0]
    candidate = first["candidate"]
    in_s3 = s3.exists(f"{BUCKET}/checkpoints/{candidate}/loopchat.json")
    ran_on = _round_host(work, first["round"])
    figures["round"] = {"candidate": candidate, "rankings_new": first["rankings_new"],
                        "ran_on": ran_on, "checkpoint_in_s3": in_s3}  # fmt: skip

    # 2. a promote reaches both replicas through Redis pub/sub
    t0 = time.monotonic()
    promote = f"{url1}/admin/checkpoints/{candidate}/promote"
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    # The demo shows the promote travelling, not the candidate's quality: a tiny model's
    # 16-ranking round may fail its gate, and then the operator's audited force is the way.
    body = (
        {}
        if first.get("gate", {}).get("passed")
        else {
            "force": True,
            "reason": "scale demo: the promote's path to both replicas is measured",
        }
    )
    httpx.post(promote, headers=bearer, json=body, timeout=60).raise_for_status()
    seen = {}
    for url in (url1, url2):
        wait_until(
            f"{url} serves {candidate}", lambda u=url: client.version_of(u) == candidate, 120
        )
        seen[url] = round(time.monotonic() - t0, 2)
    figures["promote_to_both_s"] = max(seen.values())

    # 3. api2 killed mid-traffic: api1 keeps serving, no ranking lost
    before, failed_before = client.posted, client.failed
    stop = threading.Event()

    def traffic(k: int) -> None:
        i = 1000 * k
        while not stop.is_set():
            client.rank_one(i)
            i += 1

    threads = [threading.Thread(target=traffic, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(6)
    api2.kill()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join()
    figures["kill"] = {"rankings_posted": client.posted - before,
                       "failed_requests": client.failed - failed_before}  # fmt: skip

    # 4. a second worker on another host shares the queue: rounds queued at once go to both
    wait_until("queue idle", lambda: _idle(r, work), 600)
    worker("worker2")
    wait_until(
        "worker2 heartbeat",
        lambda: r.zcount("loopchat:workers", time.time() - 15, "+inf") >= 2,
        120,
    )
    from serve.loop_trigger import send_round

    taken_before = _tasks_by_worker(work)
    for attempt in range(8):  # queue rounds until worker2 has run one and every ranking is used
        for i in range(4):
            client.rank_one(5000 + 10 * attempt + i)
        send_round(redis_url)
        time.sleep(1)
        wait_until("queue idle again", lambda: _idle(r, work), 900)
        rounds = _done_rounds(r, 0) or []
        hosts = [_round_host(work, x["round"]) for x in rounds]
        if "worker2" in hosts and sum(x["rankings_new"] for x in rounds) == r.xlen(STREAM):
            break
    taken = _tasks_by_worker(work)
    figures["round_tasks_taken"] = {h: taken[h] - taken_before.get(h, 0) for h in taken}
    figures["rounds"] = [
        {"rankings_new": x["rankings_new"], "ran_on": h} for x, h in zip(rounds, hosts, strict=True)
    ]

    # totals: every 201 is in the stream once; no stream entry in two rounds
    counted = r.xlen(STREAM)
    ids = [e[0] for e in r.xrange(STREAM)]
    spans = sorted(
        (ids.index(x["stream"]["first"]), ids.index(x["stream"]["last"])) for x in rounds
    )
    overlap = any(a[1] >= b[0] for a, b in zip(spans, spans[1:], strict=False))
    figures["rankings"] = {"posted": client.posted, "counted": counted,
                           "lost": client.posted - counted,
                           "in_rounds": sum(x["rankings_new"] for x in rounds)}  # fmt: skip
    figures["checks"] = {
        "no_ranking_lost": client.posted == counted,
        "round_on_worker_host": ran_on == "worker1",
        "checkpoint_in_s3": in_s3,
        "promote_reached_both": len(seen) == 2,
        "replica_kill_lost_nothing": client.posted == counted
        and figures["kill"]["rankings_posted"] > 0,
        "second_worker_shares_queue": "worker2" in hosts,
        "every_ranking_in_one_round": figures["rankings"]["in_rounds"] == counted,
        "no_ranking_in_two_rounds": not overlap,
    }
    figures["total_s"] = round(time.monotonic() - started, 1)
    return figures


def _done_rounds(r: redis.Redis, at_least: int) -> list[dict] | None:
    rounds = [json.loads(x) for x in r.lrange("loopchat:loop:rounds", 0, -1)]
    rounds = [x for x in rounds if x.get("status") == "done" and not x.get("replayed")]
    return rounds if len(rounds) >= at_least else None


def _log_lines(work: Path, host: str) -> list[str]:
    log = work / f"{host}.log"
    return log.read_text(errors="replace").splitlines() if log.is_file() else []


def _tasks_by_worker(work: Path) -> dict[str, int]:
    """Round tasks each worker host took and finished: run, skipped or failed (Celery logs
    each; a round that fails, e.g. its lock lapsed on an overloaded machine, commits nothing)."""
    done = "learn.tasks.run_round["
    return {
        h: sum(
            done in line and ("succeeded" in line or "raised" in line)
            for line in _log_lines(work, h)
        )
        for h in ("worker1", "worker2")
    }


def _idle(r: redis.Redis, work: Path) -> bool:
    """Nothing queued, no round running, every received round finished."""
    received = sum(
        "run_round[" in line and "received" in line
        for h in ("worker1", "worker2")
        for line in _log_lines(work, h)
    )
    finished = sum(_tasks_by_worker(work).values())
    return r.llen("learn") == 0 and not r.exists("loopchat:loop:lock") and received == finished


def _round_host(work: Path, round_id: str) -> str | None:
    """Which worker host's log says it finished the round (Celery logs each task's success)."""
    for host in ("worker1", "worker2"):
        if any(round_id in line and "succeeded" in line for line in _log_lines(work, host)):
            return host
    return None


if __name__ == "__main__":
    sys.exit(main())
