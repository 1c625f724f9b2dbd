"""What a grammar costs the embedded engine, next to llama-server's, and whether it holds.

``lockgate serve`` on the default model (16 sequences of 512 tokens) and, as the anchor, a
real llama-server on the same GGUF (``--parallel 16``, 16 x 512 tokens of context,
``--threads`` = the cores), which turns ``response_format`` into a GBNF grammar. Both stay
up; only one is sent requests at a time (two cores). Three phases:

1. Throughput: at each of ``--clients``, that many clients send chats (48 tokens at most,
   temperature 0.7) back to back, the arms interleaved over ``--rounds`` (reversed every
   other round): Lockgate free text, ``json_object``, a 4-field ``json_schema``; llama-server
   free text and the same schema. Steady state: only tokens produced in a ``--seconds``
   window opened ``--warmup`` s in count (each answer's tokens spread over its time), and
   the clients keep sending until the window closes. Reported: tokens/s (median of rounds),
   the ratio to the engine's own free text, the share of answers that parse, and
   Lockgate's schema tokens/s over llama-server's.
2. Validity: the 30 schemas of loadtests/structured_schemas.py x ``--seeds`` seeds (sent
   together), ``strict: true``, temperature 0.8, 256 tokens at most. Per schema and engine:
   the HTTP status ("timeout" after ``--suite-timeout`` s, and the engine is restarted), how
   many ``stop`` answers parse (a repeated key fails) and validate (jsonschema, Draft
   2020-12, formats checked), how many ended with ``length``. A pass: accepted and every
   ``stop`` answer valid, or a 400 naming ``response_format``. The goal is Lockgate's;
   llama-server is judged the same way, for comparison.
3. TTFT at 1 client, streamed, ``--ttft-pairs`` times: a schema never seen (a new enum
   value), the same schema again, free text; the p50 of each and first-seen / cached.

Tables go to stdout, everything measured to ``--out``; ``--phases``, ``--schemas`` and
``--skip-llama-server`` run a part.

    python loadtests/bench_structured.py             # about 25 minutes on two idle cores
    python loadtests/bench_structured.py --quick --out /tmp/s.json     # smoke, about 4
    python loadtests/bench_structured.py --phases validity --skip-llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
import httpx
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from referencing.exceptions import Unresolvable
from structured_schemas import CASES, Case, Schema

HERE = Path(__file__).resolve().parent
CHAT = "/v1/chat/completions"
N_CTX, SEQUENCES = 512, 16
SCHEMA: Schema = {
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
FORMATS: dict[str, dict[str, Any] | None] = {
    "free": None,
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
}
ARMS = {"lockgate": ("free", "json_object", "json_schema"), "llama-server": ("free", "json_schema")}
FULL = {"clients": "1,16", "seconds": 20.0, "warmup": 5.0, "rounds": 3, "seeds": 5,
        "ttft_pairs": 20}  # fmt: skip
QUICK = {"clients": "1", "seconds": 3.0, "warmup": 1.0, "rounds": 1, "seeds": 1, "ttft_pairs": 3}


class Server:
    """One engine as a subprocess; restartable, since a schema may crash llama-server."""

    def __init__(self, name: str, cmd: list[str], port: int, health: str, root: Path) -> None:
        self.name, self.cmd, self.root = name, cmd, root
        self.base = f"http://127.0.0.1:{port}"
        self.health = self.base + health
        self.env = harness.gateway_env(root) if name == "lockgate" else None
        self.starts = 0
        self._stack = contextlib.ExitStack()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.starts += 1
        log = self.root / f"{self.name}-{self.starts}.log"
        self._proc = self._stack.enter_context(harness.spawned(self.cmd, log, self.env))
        harness.wait_http(self.health, self._proc)

    def stop(self) -> None:
        self._stack.close()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


def chat(content: str, *, seed: int, max_tokens: int, temperature: float) -> dict[str, Any]:
    # The sampler spelled out: llama-server's defaults (top_p 0.95, min_p 0.05) differ.
    return {
        "model": "gemma", "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
        "top_k": 40, "top_p": 1.0, "min_p": 0.0,
    }  # fmt: skip


def client_for(server: Server, connections: int, timeout: float = 180) -> httpx.AsyncClient:
    # No keep-alive: llama-server may close an idle connection just as a client reuses it.
    limits = httpx.Limits(max_connections=connections + 2, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=server.base, timeout=timeout, limits=limits)


# --- 1. throughput ---------------------------------------------------------------------


def in_window(sent: float, done: float, tokens: int, window: tuple[float, float]) -> float:
    """The share of a request's ``tokens`` produced inside ``window``, spread evenly."""
    overlap = min(done, window[1]) - max(sent, window[0])
    return tokens * max(overlap, 0.0) / (done - sent) if done > sent else 0.0


async def throughput_arm(
    server: Server, fmt: dict[str, Any] | None, clients: int, seconds: float, warmup: float
) -> dict[str, float]:
    """Steady-state tokens/s: every client keeps one request open from the start until the
    window (``warmup`` s in, ``seconds`` long) has closed, and only the tokens that fall
    inside the window count. Arms whose answers end early are not charged for a ragged tail
    in which fewer than ``clients`` requests are still running."""
    done_at: list[tuple[float, float, int]] = []
    times, parsed, answers = [], 0, 0
    begin = time.perf_counter()
    window = (begin + warmup, begin + warmup + seconds)
    async with client_for(server, clients) as http:

        async def client(i: int) -> None:
            nonlocal parsed, answers
            n = 0
            while time.perf_counter() < window[1]:
                n += 1
                body = chat("Describe a person as JSON.", seed=i * 1000 + n, max_tokens=48,
                            temperature=0.7)  # fmt: skip
                if fmt is not None:
                    body["response_format"] = fmt
                sent = time.perf_counter()
                response = await http.post(CHAT, json=body)
                done = time.perf_counter()
                if response.status_code != 200:
                    raise RuntimeError(f"{server.name}: {response.status_code} {response.text}")
                r = response.json()
                produced = r["usage"]["completion_tokens"]
                done_at.append((sent, done, produced))
                if produced:
                    times.append((done - sent) / produced)
                answers += 1
                if r["choices"][0]["finish_reason"] == "stop":
                    with contextlib.suppress(json.JSONDecodeError):
                        json.loads(r["choices"][0]["message"]["content"])
                        parsed += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    counted = sum(in_window(sent, done, tokens, window) for sent, done, tokens in done_at)
    return {
        "tokens_per_s": counted / seconds,
        "s_per_token_p50": statistics.median(times),
        "tokens_per_answer": sum(t for _, _, t in done_at) / max(answers, 1),
        "answers": answers,
        "parsed_share": parsed / max(answers, 1),
    }


def run_throughput(
    servers: list[Server], levels: list[int], rounds: int, seconds: float, warmup: float
) -> dict[str, Any]:
    arms = [(s, name) for s in servers for name in ARMS[s.name]]
    runs: dict[int, dict[str, list[dict[str, float]]]] = {
        c: {f"{s.name}/{name}": [] for s, name in arms} for c in levels
    }
    for server, name in arms:  # compiles the schema, builds Lockgate's tokenizer (~1.5 s)
        asyncio.run(throughput_arm(server, FORMATS[name], 1, 0.1, 0.0))
    for clients in levels:
        for r in range(rounds):
            for server, name in arms if r % 2 == 0 else reversed(arms):
                result = asyncio.run(
                    throughput_arm(server, FORMATS[name], clients, seconds, warmup)
                )
                runs[clients][f"{server.name}/{name}"].append(result)
                print(f"  c={clients} round {r + 1} {server.name}/{name:12} "
                      f"{result['tokens_per_s']:6.1f} tok/s", flush=True)  # fmt: skip
    summary: dict[int, dict[str, dict[str, float]]] = {
        clients: {
            arm: {k: statistics.median(x[k] for x in results) for k in results[0]}
            for arm, results in by_arm.items()
        }
        for clients, by_arm in runs.items()
    }
    comparison: dict[int, dict[str, float]] = {}
    for clients, by_arm in summary.items():
        for arm, s in by_arm.items():
            s["ratio_to_free"] = (
                s["tokens_per_s"] / by_arm[arm[: arm.index("/")] + "/free"]["tokens_per_s"]
            )
        schema = {e: by_arm[f"{e}/json_schema"] for e in ARMS if f"{e}/json_schema" in by_arm}
        row = {f"{e}_schema_to_free": s["ratio_to_free"] for e, s in schema.items()}
        if len(schema) == 2:
            row["lockgate_schema_to_llama_server_schema"] = (
                schema["lockgate"]["tokens_per_s"] / schema["llama-server"]["tokens_per_s"]
            )
        comparison[clients] = row
    return {"summary": summary, "comparison": comparison, "runs": runs}


def print_throughput(result: dict[str, Any]) -> None:
    print("\n| clients | engine / arm | tokens/s | to its free text | answers that parse |"
          "\n|---:|---|---:|---:|---:|")  # fmt: skip
    for clients, by_arm in result["summary"].items():
        for arm, s in by_arm.items():
            print(f"| {clients} | {arm} | {s['tokens_per_s']:.1f} | {s['ratio_to_free']:.2f} | "
                  f"{s['parsed_share']:.0%} |")  # fmt: skip
    print("\n| clients | Lockgate schema / free | llama-server schema / free "
          "| Lockgate schema / llama-server schema |\n|---:|---:|---:|---:|")  # fmt: skip
    for clients, row in result["comparison"].items():
        cells = [row.get(f"{e}_schema_to_free") for e in ARMS]
        cells.append(row.get("lockgate_schema_to_llama_server_schema"))
        print(
            f"| {clients} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |"
        )


# --- 2. validity -----------------------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys, so the validator would never see them.
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def violation(validator: Any, content: str) -> str | None:
    """Why ``content`` is not a valid instance (repeated keys included), or None."""
    try:
        instance = json.loads(content, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        return f"does not parse: {e}"
    except ValueError as e:  # from _unique_keys
        return str(e)
    try:
        error = next(iter(validator.iter_errors(instance)), None)
    except Unresolvable as e:  # the schema's own dangling $ref
        return f"schema unresolvable: {e}"
    return None if error is None else f"{'/'.join(map(str, error.path))}: {error.message[:200]}"


async def suite_case(
    server: Server, case: Case, seeds: int, request_timeout: float
) -> dict[str, Any]:
    """Every seed of ``case`` at once; each answer with its status, finish and violation."""
    fmt = {"type": "json_schema", "json_schema": {"name": case.name, "schema": case.schema,
                                                  "strict": True}}  # fmt: skip
    checker = Draft202012Validator.FORMAT_CHECKER
    validator = Draft202012Validator(case.schema, format_checker=checker)

    async def one(seed: int) -> dict[str, Any]:
        body = chat(f"Write one {case.name.replace('_', ' ')} example as JSON.", seed=seed,
                    max_tokens=256, temperature=0.8) | {"response_format": fmt}  # fmt: skip
        sent = time.perf_counter()
        try:
            response = await http.post(CHAT, json=body)
        except httpx.HTTPError as e:  # llama-server may crash, or crawl, on a schema
            status = "timeout" if isinstance(e, httpx.TimeoutException) else "no answer"
            return {"seed": seed, "status": status, "error": f"{type(e).__name__}: {e!r}"}
        answer: dict[str, Any] = {"seed": seed, "status": response.status_code,
                                  "seconds": round(time.perf_counter() - sent, 2)}  # fmt: skip
        if response.status_code != 200:
            answer["error"] = response.text
            with contextlib.suppress(ValueError):
                answer["error"] = response.json().get("error", response.text)
            return answer
        r = response.json()
        content = r["choices"][0]["message"]["content"] or ""
        answer |= {"finish": r["choices"][0]["finish_reason"], "content": content,
                   "tokens": r["usage"]["completion_tokens"]}  # fmt: skip
        if answer["finish"] == "stop":
            answer["violation"] = violation(validator, content)
        return answer

    async with client_for(server, seeds, timeout=request_timeout) as http:
        answers = await asyncio.gather(*(one(seed) for seed in range(1, seeds + 1)))
    stops = [a for a in answers if a.get("finish") == "stop"]
    return {
        "name": case.name,
        "expected": "400" if case.refuse else "accept",
        "statuses": dict(Counter(str(a["status"]) for a in answers)),
        "stop": len(stops),
        "valid": sum(a["violation"] is None for a in stops),
        "length": sum(a.get("finish") == "length" for a in answers),
        "answers": answers,
    }


def verdict(row: dict[str, Any]) -> str:
    """Lockgate's goal: every accepted schema yields valid JSON; the rest are a clean 400."""
    statuses = row["statuses"]
    if statuses == {"200": row["stop"] + row["length"]}:
        if row["stop"] == 0:
            return "no stop"
        return "pass" if row["valid"] == row["stop"] else "FAIL"
    errors = [a["error"] for a in row["answers"]]
    named = all(isinstance(e, dict) and e.get("param") == "response_format" for e in errors)
    return "pass" if list(statuses) == ["400"] and named else "FAIL"


def run_validity(
    server: Server, cases: list[Case], seeds: int, timeout: float
) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        row = asyncio.run(suite_case(server, case, seeds, timeout))
        row["verdict"] = verdict(row)
        if not server.alive():
            row["verdict"], row["crashed"] = "crashed", True
        if {"timeout", "no answer"} & set(row["statuses"]):  # a fresh process, no work left
            server.stop()
            server.start()
        rows.append(row)
        print(f"  {server.name} {case.name:28} {row['statuses']} valid {row['valid']}/"
              f"{row['stop']} length {row['length']} {row['verdict']}", flush=True)  # fmt: skip
    return rows


def print_validity(results: dict[str, list[dict[str, Any]]], cases: list[Case]) -> None:
    engines = list(results)
    seeds = sum(results[engines[0]][0]["statuses"].values())
    head = "".join(f" {e} HTTP | valid/stop | length | verdict |" for e in engines)
    print(f"\n| # | schema | expected |{head}")
    print("|---:|---|---|" + "---|---:|---:|---|" * len(engines))
    for i, case in enumerate(cases):
        cells = "".join(
            f" {','.join(f'{k}x{n}' for k, n in r['statuses'].items()).removesuffix(f'x{seeds}')}"
            f" | {r['valid']}/{r['stop']} | {r['length']} | {r['verdict']} |"
            for r in (results[e][i] for e in engines)
        )
        print(f"| {i + 1} | {case.name} | {'400' if case.refuse else 'accept'} |{cells}")
    for engine, rows in results.items():
        print(f"\n{engine}:")
        for row in rows:
            for a in row["answers"]:
                if a["status"] != 200:
                    error = a["error"]
                    said = error.get("message", error) if isinstance(error, dict) else error
                    print(f"  {row['name']}: {a['status']} {said!s:.300}")
                    break
            for a in row["answers"]:
                if a.get("violation"):
                    print(f"  {row['name']} seed {a['seed']} INVALID {a['violation']}: "
                          f"{a['content'][:200]!r}")  # fmt: skip
        failed = [r["name"] for r in rows if r["verdict"] != "pass"]
        print(f"  {len(rows) - len(failed)}/{len(rows)} pass; not: {', '.join(failed) or '-'}")


# --- 3. TTFT, first-seen vs cached schema ----------------------------------------------


async def ttft_s(http: httpx.AsyncClient, body: dict[str, Any]) -> float | None:
    """Seconds to the first streamed content, or None if none came."""
    sent = time.perf_counter()
    async with http.stream("POST", CHAT, json=body | {"stream": True}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - sent
                    break
        else:
            return None
    # Closing the stream cancels the rest; give the engine a decode step to free the slot.
    await asyncio.sleep(0.05)
    return first


def unique_format(tag: str) -> dict[str, Any]:
    schema = copy.deepcopy(SCHEMA)
    schema["properties"]["city"]["enum"].append(f"Town {tag}")
    return {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}


async def ttft_pairs(server: Server, pairs: int) -> dict[str, Any]:
    """``pairs`` times: a new schema, the same again, free text; TTFT p50 of each."""
    samples: dict[str, list[float]] = {"first_seen": [], "cached": [], "free": []}
    empty = 0
    run = secrets.token_hex(4)  # unique across runs too, though each run starts a fresh gateway
    async with client_for(server, 1) as http:
        for i in range(-1, pairs):  # -1 warms the connection and the tokenizer up
            fmt = unique_format(f"{run}-{i}")
            # Room to spare: llama-server holds a leading "```json" back until it knows.
            body = chat("Describe a person as JSON.", seed=i + 2, max_tokens=32, temperature=0.7)
            times = {
                "first_seen": await ttft_s(http, body | {"response_format": fmt}),
                "cached": await ttft_s(http, body | {"response_format": fmt}),
                "free": await ttft_s(http, body),
            }
            for k, v in times.items() if i >= 0 else ():
                if v is None:
                    empty += 1
                else:
                    samples[k].append(v)
    p50 = {f"{k}_ms_p50": statistics.median(v) * 1000 for k, v in samples.items()}
    return p50 | {"first_seen_to_cached": p50["first_seen_ms_p50"] / p50["cached_ms_p50"],
                  "streams_without_content": empty,
                  "samples_ms": {k: [x * 1000 for x in v] for k, v in samples.items()}}  # fmt: skip


def print_ttft(results: dict[str, dict[str, Any]]) -> None:
    print("\n| engine | TTFT first-seen schema | cached schema | free text | first-seen / cached |"
          "\n|---|---:|---:|---:|---:|")  # fmt: skip
    for engine, r in results.items():
        print(f"| {engine} | {r['first_seen_ms_p50']:.1f} ms | {r['cached_ms_p50']:.1f} ms | "
              f"{r['free_ms_p50']:.1f} ms | {r['first_seen_to_cached']:.2f} |")  # fmt: skip


# --- the run ---------------------------------------------------------------------------


def servers_for(args: argparse.Namespace, root: Path) -> list[Server]:
    cores = os.cpu_count() or 2
    port = harness.free_port()
    config = root / "config.yaml"
    config.write_text(
        f"server: {{port: {port}, log_level: warning, access_log: 'off'}}\nmodels:\n"
        f"  - {{name: gemma, n_ctx: {N_CTX}, max_sequences: {SEQUENCES}, threads: {cores}}}\n"
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    servers = [Server("lockgate", cmd, port, "/health/ready", root)]
    if not args.skip_llama_server:
        binary = harness.find_llama_server(args.llama_server)
        if binary is None:
            raise SystemExit("llama-server not found; `make llama-server` installs it")
        port = harness.free_port()
        cmd = [binary, "-m", str(harness.default_model()), "--host", "127.0.0.1",
               "--port", str(port), "--parallel", str(SEQUENCES), "-c", str(N_CTX * SEQUENCES),
               "--no-webui", "--threads", str(cores), "--threads-batch", str(cores)]  # fmt: skip
        servers.append(Server("llama-server", cmd, port, "/health", root))
    return servers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", help=f"client counts (default {FULL['clients']})")
    parser.add_argument("--seconds", type=float, help="per arm and round (default 20)")
    parser.add_argument("--warmup", type=float, help="s before a throughput window (default 5)")
    parser.add_argument("--rounds", type=int, help="throughput rounds (default 3)")
    parser.add_argument("--seeds", type=int, help="validity seeds per schema (default 5)")
    parser.add_argument("--ttft-pairs", type=int, help="first-seen/cached pairs (default 20)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke defaults: " + " ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--phases", default="throughput,validity,ttft")
    parser.add_argument("--schemas", help="validity: only these (comma-separated names)")
    parser.add_argument("--suite-timeout", type=float, default=120, help="seconds a request")
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument("--llama-server", help="its binary (default: as `make llama-server`)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_structured.json")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    phases = set(args.phases.split(","))
    root = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    wanted = set(args.schemas.split(",")) if args.schemas else {c.name for c in CASES}
    cases = [c for c in CASES if c.name in wanted]
    if len(cases) < len(wanted) or not phases <= {"throughput", "validity", "ttft"}:
        raise SystemExit(f"unknown schema or phase; schemas: {', '.join(c.name for c in CASES)}")
    servers = servers_for(args, root)
    report: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": harness.git_revision(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "commands": {s.name: s.cmd for s in servers},
    }
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.start()
        if "throughput" in phases:
            levels = [int(c) for c in args.clients.split(",")]
            report["throughput"] = run_throughput(
                servers, levels, args.rounds, args.seconds, args.warmup
            )
        if "validity" in phases:
            report["validity"] = {
                s.name: run_validity(s, cases, args.seeds, args.suite_timeout) for s in servers
            }
        if "ttft" in phases:
            report["ttft"] = {s.name: asyncio.run(ttft_pairs(s, args.ttft_pairs)) for s in servers}
    if "throughput" in report:
        print_throughput(report["throughput"])
    if "validity" in report:
        print_validity(report["validity"], cases)
    if "ttft" in report:
        print_ttft(report["ttft"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} (logs in {root})")


if __name__ == "__main__":
    main()
