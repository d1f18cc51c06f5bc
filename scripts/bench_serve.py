#!/usr/bin/env python3
"""Serving benchmark for `marlin serve`: output throughput, TTFT and inter-token latency at
several concurrency levels, measured by a streaming client like vLLM's benchmark_serving.

Each level keeps CONCURRENCY requests in flight until REQUESTS (default 2 × concurrency, at
least 8) have finished. Every request is a chat prompt with `max_tokens` and `ignore_eos`, so
each one generates exactly that many tokens. TTFT is the time to the first streamed text; ITL is
the time between streamed text chunks (one token each unless the detokenizer holds text back).

    cargo build --release -p marlin-cli
    python3 scripts/bench_serve.py                     # starts `marlin serve` itself
    python3 scripts/bench_serve.py --url http://127.0.0.1:8000 --concurrency 1 8 32 --json

Needs `pip install httpx`. The client runs on the same machine as the server and takes some of
its CPU.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the sea", "a cat", "mountains", "coffee", "rain", "the moon", "a robot", "autumn",
          "bread", "music", "a river", "snow", "a library", "the desert", "bees", "trains"]


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client, url, model, i, max_tokens):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Story {i}: write a long story about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, last, itls, usage = None, None, [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - start
                    else:
                        itls.append(now - last)
                    last = now
    return ttft, itls, usage["completion_tokens"], time.perf_counter() - start


async def run_level(url, model, concurrency, requests, max_tokens):
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        queue = list(range(requests))
        results = []

        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(client, url, model, i, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    itls = [x for r in results for x in r[1]]
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "output_tokens": tokens,
        "seconds": wall,
        "output_tok_s": tokens / wall,
        **{f"ttft_p{p}_ms": 1000 * percentile(ttfts, p) for p in (50, 95, 99)},
        **{f"itl_p{p}_ms": 1000 * percentile(itls, p) for p in (50, 95, 99)},
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server; default: start `marlin serve`")
    ap.add_argument("--model", default="smollm2", help="model id (and MODEL for marlin serve)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, help="requests per level [2 x concurrency, >= 8]")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print one JSON object per level")
    ap.add_argument("serve_args", nargs="*", help="extra `marlin serve` flags (after --)")
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        port = free_port()
        binary = os.environ.get("MARLIN_BIN", str(ROOT / "target" / "release" / "marlin"))
        proc = subprocess.Popen([binary, "serve", args.model, "--port", str(port), *args.serve_args],
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                sys.exit("marlin serve did not become healthy")
            time.sleep(0.1)
    try:
        # Warm-up: page in the weights and the first KV blocks.
        asyncio.run(run_level(url, args.model, 1, 1, 8))
        rows = []
        for c in args.concurrency:
            row = asyncio.run(run_level(url, args.model, c, args.requests or max(8, 2 * c),
                                        args.max_tokens))
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
        if not args.json:
            print("| concurrency | requests | output tok/s | TTFT p50 / p95 / p99 (ms) "
                  "| ITL p50 / p95 / p99 (ms) |")
            print("| ---: | ---: | ---: | ---: | ---: |")
            for r in rows:
                print(f"| {r['concurrency']} | {r['requests']} | {r['output_tok_s']:.1f} | "
                      f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                      f"{r['itl_p50_ms']:.1f} / {r['itl_p95_ms']:.1f} / {r['itl_p99_ms']:.1f} |")
            base = rows[0]["output_tok_s"]
            for r in rows[1:]:
                print(f"throughput at {r['concurrency']} = {r['output_tok_s'] / base:.2f}x "
                      f"that at {rows[0]['concurrency']}")
    finally:
        if proc:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
