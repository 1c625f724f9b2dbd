"""Does the gateway leak under a steady load? RSS and open file descriptors, sampled.

``lockgate serve`` with the embedded engine and the fake backend runs for ``--minutes``
(10 by default) under a steady closed loop: 8 clients sending non-streamed and streamed
chats, a fifth of which hang up part-way. Every ``--every`` seconds the gateway's RSS and its
open fds are read from /proc. Reported: the first and last samples, the growth per minute
over the second half (after warm-up), a table, JSON, and a PNG of both curves.

    python loadtests/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from harness import free_port, gateway_env, git_revision, spawned, tree_rss_mb, wait_http

HERE = Path(__file__).resolve().parent
CONFIG = """server: {{port: {port}, log_level: warning}}
models:
  - {{name: gemma, n_ctx: 512, max_sequences: 4}}
  - {{name: echo, backend: fake, delay: 0.005, capacity: 8}}
"""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def load(base: str, stop: float, counts: dict[str, int]) -> None:
    rng = random.Random(7)
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            while time.monotonic() < stop:
                model = "gemma" if rng.random() < 0.3 else "echo"
                stream = rng.random() < 0.5
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": "tell me a story " * 4}],
                    "max_tokens": 12,
                    "stream": stream,
                }
                hang_up = stream and rng.random() < 0.2
                try:
                    async with session.post(f"{base}/v1/chat/completions", json=body) as r:
                        if hang_up:
                            await r.content.readline()
                            r.close()  # leave part-way
                            counts["hung_up"] += 1
                            continue
                        await r.read()
                        counts[str(r.status)] = counts.get(str(r.status), 0) + 1
                except aiohttp.ClientError:
                    counts["client_error"] = counts.get("client_error", 0) + 1

        await asyncio.gather(*(client() for _ in range(8)))


async def soak(
    base: str, pid: int, minutes: float, every: float
) -> tuple[list[dict[str, float]], dict[str, int]]:
    samples: list[dict[str, float]] = []
    counts: dict[str, int] = {"hung_up": 0}
    started = time.monotonic()
    stop = started + minutes * 60
    loader = asyncio.create_task(load(base, stop, counts))
    while time.monotonic() < stop:
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                "rss_mb": round(tree_rss_mb(pid), 2),
                "fds": open_fds(pid),
                "requests": sum(v for k, v in counts.items()),
            }
        )
        print(f"  {samples[-1]}", flush=True)
        await asyncio.sleep(every)
    await loader
    return samples, counts


def slope(samples: list[dict[str, float]], key: str) -> float:
    """Least-squares growth per minute over the second half of the run."""
    half = samples[len(samples) // 2 :]
    xs, ys = [s["t_s"] / 60 for s in half], [s[key] for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def per_thousand(samples: list[dict[str, float]], key: str) -> float:
    """Growth per 1,000 requests over the second half (a leak grows with requests, not time)."""
    half = samples[len(samples) // 2 :]
    served = half[-1]["requests"] - half[0]["requests"]
    return 1000 * (half[-1][key] - half[0][key]) / served if served else 0.0


def spread(samples: list[dict[str, float]], key: str) -> float:
    half = samples[len(samples) // 2 :]
    return max(s[key] for s in half) - min(s[key] for s in half)


def plot(samples: list[dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, fds) = plt.subplots(1, 2, figsize=(10, 3.8))
    minutes = [s["t_s"] / 60 for s in samples]
    rss.plot(minutes, [s["rss_mb"] for s in samples], marker=".")
    rss.set_ylabel("gateway RSS, MB")
    fds.plot(minutes, [s["fds"] for s in samples], marker=".", color="tab:orange")
    fds.set_ylabel("open file descriptors")
    for ax in (rss, fds):
        ax.set_xlabel("minutes under load")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle("soak: 8 clients, embedded + fake backends, 20% of streams hung up")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="soak-"))
        port = free_port()
        config = root / "config.yaml"
        config.write_text(CONFIG.format(port=port))
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        proc = stack.enter_context(spawned(cmd, root / "log.txt", gateway_env(root)))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health/ready", proc)
        samples, counts = asyncio.run(soak(base, proc.pid, args.minutes, args.every))
    growth = {
        "rss_mb_per_minute": slope(samples, "rss_mb"),
        "fds_per_minute": slope(samples, "fds"),
        "rss_mb_per_1000_requests": per_thousand(samples, "rss_mb"),
        "rss_mb_range_second_half": spread(samples, "rss_mb"),
        "fds_range_second_half": spread(samples, "fds"),
    }
    first, last = samples[0], samples[-1]
    print("\n| | start | end | second half: per minute | per 1,000 requests | range |")
    print("|---|---:|---:|---:|---:|---:|")
    g = growth
    print(f"| RSS, MB | {first['rss_mb']:.1f} | {last['rss_mb']:.1f} | "
          f"{g['rss_mb_per_minute']:+.2f} | {g['rss_mb_per_1000_requests']:+.3f} | "
          f"{g['rss_mb_range_second_half']:.2f} |")  # fmt: skip
    print(f"| open fds | {first['fds']} | {last['fds']} | {g['fds_per_minute']:+.2f} | "
          f"{per_thousand(samples, 'fds'):+.3f} | {g['fds_range_second_half']:.0f} |")  # fmt: skip
    print(f"requests: {counts}")
    report = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
        "minutes": args.minutes,
        "counts": counts,
        "growth": growth,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(samples, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
