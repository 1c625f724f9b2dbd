"""Planned vs measured memory: `lockgate plan` against a real `lockgate serve`'s peak RSS.

For each setting (n_ctx x max_sequences) the gateway is started on the default model,
every slot is filled with a streamed completion whose prompt takes ~80% of the context
(memory the engine allocates but never writes is not resident: short prompts would
flatter the plan), and the server's peak resident memory (VmHWM) is read from /proc.
The same gateway on a fake backend gives what Python and the gateway cost without an
engine; the rest is the engine's, which `lockgate plan --json` predicts from the GGUF
header.

    python loadtests/bench_memory.py [--out loadtests/results/memory]

Prints a table and writes memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import harness
import httpx

MiB = 1 << 20
SETTINGS = [(2048, 16), (512, 8), (4096, 4)]
SENTENCE = "The tide came in over the sand and the gulls rose from the rocks."  # ~16 tokens


def high_water(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


async def fill(url: str, slots: int, n_ctx: int) -> None:
    prompt = " ".join([SENTENCE] * (n_ctx * 4 // 5 // 16))
    body = {
        "model": "bench", "prompt": prompt, "max_tokens": 32, "stream": True,
        "logit_bias": harness.NO_EOG,
    }  # fmt: skip
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(i: int) -> None:
            request = {**body, "prompt": f"{i}. {prompt}"}
            async with client.stream("POST", url, json=request) as r:
                r.raise_for_status()
                async for _ in r.aiter_lines():
                    pass

        await asyncio.gather(*(one(i) for i in range(slots)))


def serve(models_yaml: str, workdir: Path, slots: int, n_ctx: int) -> int:
    """Start the gateway, fill its slots, return its peak RSS in bytes."""
    port = harness.free_port()
    config = workdir / "lockgate.yaml"
    config.write_text(f"server: {{port: {port}, log_level: warning}}\nmodels:\n{models_yaml}")
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    with harness.spawned(cmd, workdir / "lockgate.log") as proc:
        harness.wait_http(f"http://127.0.0.1:{port}/health/ready", proc)
        asyncio.run(fill(f"http://127.0.0.1:{port}/v1/completions", slots, n_ctx))
        return high_water(proc.pid)


def planned(model: Path, n_ctx: int, slots: int) -> float:
    """The plan's total, in bytes."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "plan", str(model), "--n-ctx", str(n_ctx),
         "--slots", str(slots), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(json.loads(done.stdout)["plan"]["total"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/memory"))
    args = parser.parse_args()
    model = harness.default_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake = "  - {name: bench, backend: fake, capacity: 16}\n"
        base = serve(fake, root, 16, 512)
        for n_ctx, slots in SETTINGS:
            yaml = f"  - {{name: bench, path: '{model}', n_ctx: {n_ctx}, max_sequences: {slots}}}\n"
            peak = serve(yaml, root, slots, n_ctx)
            plan = planned(model, n_ctx, slots)
            rows.append(
                {
                    "n_ctx": n_ctx,
                    "slots": slots,
                    "planned_mib": plan / MiB,
                    "peak_rss_mib": peak / MiB,
                    "gateway_without_engine_mib": base / MiB,
                    "engine_measured_mib": (peak - base) / MiB,
                }
            )
    print(
        "| n_ctx x slots | planned MiB | peak RSS MiB | without engine MiB | engine MiB"
        " | engine / plan |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n_ctx']} x {r['slots']} | {r['planned_mib']:,.1f} | {r['peak_rss_mib']:,.1f} |"
            f" {r['gateway_without_engine_mib']:,.1f} | {r['engine_measured_mib']:,.1f} |"
            f" {r['engine_measured_mib'] / r['planned_mib']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
