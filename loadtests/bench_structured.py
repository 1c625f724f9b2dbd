"""What a grammar costs the embedded engine: the same requests free and constrained.

``lockgate serve`` on the default model (16 sequences); at each of ``--clients`` (1 and
16) that many concurrent clients send chats for ``--seconds`` per arm, arms alternated
over ``--rounds``: free text, ``json_object`` and a ``json_schema`` (a small object).
Reported per arm: completion tokens/s, the share of answers that parse, and the ratio
to free text.

    python loadtests/bench_structured.py --clients 1,16 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from harness import free_port, gateway_env, git_revision, spawned, wait_http

HERE = Path(__file__).resolve().parent
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "city": {"type": "string", "enum": ["Paris", "Lima", "Oslo"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
ARMS: dict[str, dict[str, Any] | None] = {
    "free": None,
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
}


async def arm(
    base: str, fmt: dict[str, Any] | None, clients: int, seconds: float
) -> dict[str, float]:
    tokens, times, parsed, answers = 0, [], 0, 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:

        async def client(i: int) -> None:
            nonlocal tokens, parsed, answers
            n = 0
            while time.monotonic() < stop:
                n += 1
                body: dict[str, Any] = {
                    "model": "gemma", "max_tokens": 48, "temperature": 0.7, "seed": i * 1000 + n,
                    "messages": [{"role": "user", "content": "Describe a person as JSON."}],
                }  # fmt: skip
                if fmt is not None:
                    body["response_format"] = fmt
                sent = time.perf_counter()
                r = (await http.post("/v1/chat/completions", json=body)).json()
                took = time.perf_counter() - sent
                produced = r["usage"]["completion_tokens"]
                tokens += produced
                if produced:
                    times.append(took / produced)
                answers += 1
                if r["choices"][0]["finish_reason"] == "stop":
                    try:
                        json.loads(r["choices"][0]["message"]["content"])
                        parsed += 1
                    except json.JSONDecodeError:
                        pass

        started = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.monotonic() - started
    return {
        "tokens_per_s": tokens / elapsed,
        "s_per_token_p50": statistics.median(times),
        "answers": answers,
        "parsed_share": parsed / max(answers, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_structured.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    port = free_port()
    config = root / "config.yaml"
    config.write_text(
        f"server: {{port: {port}, log_level: warning, access_log: 'off'}}\n"
        "models:\n  - {name: gemma, n_ctx: 512, max_sequences: 16}\n"
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    levels = [int(c) for c in args.clients.split(",")]
    runs: dict[int, dict[str, list[dict[str, float]]]] = {c: {n: [] for n in ARMS} for c in levels}
    with spawned(cmd, root / "lockgate.log", gateway_env(root)) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health/ready", proc)
        for clients in levels:
            for r in range(args.rounds):
                order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
                for name in order:
                    result = asyncio.run(arm(base, ARMS[name], clients, args.seconds))
                    runs[clients][name].append(result)
                    print(f"  c={clients} round {r + 1} {name:12} {result}", flush=True)
    summary = {
        clients: {
            name: {k: statistics.median(x[k] for x in results) for k in results[0]}
            for name, results in by_arm.items()
        }
        for clients, by_arm in runs.items()
    }
    print("\n| clients | arm | tokens/s | ratio to free | answers that parse |")
    print("|---:|---|---:|---:|---:|")
    for clients, by_arm in summary.items():
        free = by_arm["free"]["tokens_per_s"]
        for name, s in by_arm.items():
            print(f"| {clients} | {name} | {s['tokens_per_s']:.1f} | "
                  f"{s['tokens_per_s'] / free:.2f} | {s['parsed_share']:.0%} |")  # fmt: skip
    report = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
