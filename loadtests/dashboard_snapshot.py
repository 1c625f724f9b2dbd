"""The dashboard, drawn from real data: a gateway, Prometheus and traffic, then a picture.

Runs `lockgate serve` on the default model (a primary instance and a canary of it, two
tenants, the request log off, small drift windows), Debian's Prometheus scraping it
every second with the alert rules loaded, and for ``--minutes``:

- two users of ``team-a`` streaming chats back to back; halfway through they ask for
  shorter answers (the drift panels see the completion-length change);
- one user of ``team-b`` sending short chats as fast as its 30 requests a minute and
  20,000 tokens a day allow (429s on the refusal panels, its budget filling up);
- a bad key and an unknown model now and then (401, 404);
- a 60-line batch from ``team-a`` a minute in (the batch panels).

Then deploy/grafana/render.py draws every panel from Prometheus over the run:
``--out`` (PNG) and a JSON of how many series each panel had.

    python loadtests/dashboard_snapshot.py --minutes 5 --out loadtests/results/dashboard.png
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness
import httpx
import openai

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "deploy" / "grafana"))
import render  # noqa: E402 - a script of deploy/, found by path

ADMIN = "admin-" + "d" * 40


def config(port: int, key_a: str, key_b: str) -> str:
    return f"""
server: {{host: 127.0.0.1, port: {port}, log_level: warning}}
models:
  - {{name: gemma, n_ctx: 1024, max_sequences: 4}}
  - {{name: gemma, id: canary, n_ctx: 1024, max_sequences: 2, weight: 25, canary: true}}
routing: {{affinity: none}}
drift: {{reference: 40, window: 40, min_requests: 20}}
tenants:
  - {{id: team-a, keys: [{{id: a1, hash: '{key_a}'}}]}}
  - id: team-b
    limits: {{requests_per_minute: 30, tokens_per_day: 20000}}
    keys: [{{id: b1, hash: '{key_b}'}}]
"""


class Traffic:
    def __init__(self, base: str, key_a: str, key_b: str, seconds: float) -> None:
        self.base, self.key_a, self.key_b = base, key_a, key_b
        self.began = time.monotonic()
        self.seconds = seconds
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def _late(self) -> bool:
        return time.monotonic() - self.began > self.seconds / 2

    def chatter(self, n: int) -> None:
        with openai.OpenAI(base_url=f"{self.base}/v1", api_key=self.key_a, max_retries=0) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                short = self._late()
                try:
                    stream = c.chat.completions.create(
                        model="gemma",
                        messages=[{"role": "user", "content": f"User {n}, question {i}: "
                                   + ("Name one colour." if short else "Tell me about tides.")}],
                        max_tokens=8 if short else 24 + (i * 7) % 40,
                        stream=True,
                    )  # fmt: skip
                    for _ in stream:
                        pass
                    self._count("team-a 200")
                except openai.APIError as exc:
                    self._count(f"team-a {getattr(exc, 'status_code', 'error')}")

    def hammer(self) -> None:
        headers = {"Authorization": f"Bearer {self.key_b}"}
        body = {"model": "gemma", "max_tokens": 8,
                "messages": [{"role": "user", "content": "Say hello."}]}  # fmt: skip
        with httpx.Client(base_url=self.base, timeout=120) as http:
            while not self.stop.is_set():
                status = http.post("/v1/chat/completions", json=body, headers=headers).status_code
                self._count(f"team-b {status}")
                if status == 429:
                    self.stop.wait(1.0)

    def mistakes(self) -> None:
        body = {"model": "gemma", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while not self.stop.wait(10):
                bad = {"Authorization": "Bearer lg-" + "x" * 43}
                status = http.post("/v1/chat/completions", json=body, headers=bad).status_code
                self._count(f"bad key {status}")
                missing = {**body, "model": "no-such-model"}
                auth = {"Authorization": f"Bearer {self.key_a}"}
                status = http.post("/v1/chat/completions", json=missing, headers=auth).status_code
                self._count(f"unknown model {status}")

    def batch(self) -> None:
        if self.stop.wait(60):
            return
        lines = io.BytesIO()
        for i in range(60):
            question = f"One fact about the number {i}."
            body = {"model": "gemma", "max_tokens": 16,
                    "messages": [{"role": "user", "content": question}]}  # fmt: skip
            line = {"custom_id": f"n{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": body}  # fmt: skip
            lines.write(json.dumps(line).encode() + b"\n")
        with openai.OpenAI(base_url=f"{self.base}/v1", api_key=self.key_a, max_retries=0) as c:
            uploaded = c.files.create(file=("numbers.jsonl", lines.getvalue()), purpose="batch")
            c.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        self._count("batch submitted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dashboard.png")
    args = parser.parse_args()
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        sys.exit("prometheus is not installed: `make deploy-tools` installs Debian's")
    key_a, hash_a = harness.new_key()
    key_b, hash_b = harness.new_key()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        port = harness.free_port()
        (root / "lockgate.yaml").write_text(config(port, hash_a, hash_b))
        env = harness.gateway_env(root) | {"LOCKGATE_AUTH__ADMIN_KEY": ADMIN}
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(root / "lockgate.yaml")]
        gateway = stack.enter_context(harness.spawned(cmd, root / "lockgate.log", env))
        base = f"http://127.0.0.1:{port}"
        harness.wait_http(f"{base}/health/ready", gateway)
        shutil.copy(REPO / "deploy" / "prometheus" / "alerts.yaml", root / "alerts.yaml")
        (root / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [alerts.yaml]\n"
            "scrape_configs:\n"
            f"  - {{job_name: lockgate, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}\n"
        )
        prom_port = harness.free_port()
        prom = stack.enter_context(
            harness.spawned(
                [prometheus, f"--config.file={root / 'prometheus.yml'}",
                 f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                root / "prometheus.log",
            )
        )  # fmt: skip
        prom_url = f"http://127.0.0.1:{prom_port}"
        harness.wait_http(f"{prom_url}/-/ready", prom)
        seconds = 60 * args.minutes
        traffic = Traffic(base, key_a, key_b, seconds)
        start = time.time()
        workers = [threading.Thread(target=traffic.chatter, args=(n,)) for n in range(2)]
        workers += [threading.Thread(target=f) for f in (traffic.hammer, traffic.mistakes,
                                                         traffic.batch)]  # fmt: skip
        for w in workers:
            w.start()
        while time.monotonic() - traffic.began < seconds:
            time.sleep(5)
            print(f"{time.monotonic() - traffic.began:5.0f}s {traffic.counts}", flush=True)
        traffic.stop.set()
        for w in workers:
            w.join(timeout=120)
        time.sleep(3)  # the last scrapes
        end = time.time()
        collected = render.collect(prom_url, start=start, end=end, step=5.0, scrape=1.0)
        render.draw(
            collected,
            args.out,
            title=f"Lockgate, {args.minutes:g} minutes of real traffic on the default model"
            " (drawn from Prometheus by deploy/grafana/render.py)",
        )
        summary = {
            "minutes": args.minutes,
            "requests": traffic.counts,
            "panels": {f"{row} / {p.title}": len(p.series) for row, ps in collected for p in ps},
        }
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        empty = [name for name, n in summary["panels"].items() if n == 0]
        print(f"wrote {args.out}; panels without data: {', '.join(empty) or 'none'}")


if __name__ == "__main__":
    main()
