#!/usr/bin/env python3
"""End-to-end tests of `marlin serve` with the official `openai` client.

Starts `marlin serve` on free loopback ports with the default model (smollm2, pulled by
`marlin pull`) and checks the OpenAI API, continuous batching, preemption, cancellation, errors
and /metrics. Prints `N passed, M failed` last and exits non-zero on any failure.

    pip install openai prometheus-client
    cargo build --release -p marlin-cli && python3 scripts/test_server.py

MARLIN_BIN overrides the binary (default target/release/marlin).
"""

import concurrent.futures as futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
BIN = os.environ.get("MARLIN_BIN", str(ROOT / "target" / "release" / "marlin"))
MODEL = "smollm2"

RESULTS = {"passed": 0, "failed": 0}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `marlin serve` process on a free port; stopped by close()."""

    def __init__(self, *args, metrics_port=False, api_key=None):
        self.port = free_port()
        self.metrics_port = free_port() if metrics_port else None
        cmd = [BIN, "serve", "--port", str(self.port)]
        if self.metrics_port:
            cmd += ["--metrics-port", str(self.metrics_port)]
        if api_key:
            cmd += ["--api-key", api_key]
        cmd += list(args)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key or "unused"
        self.health_codes = set()
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"marlin serve exited: {self.output()}")
            try:
                r = httpx.get(self.base + "/health", timeout=2)
                self.health_codes.add(r.status_code)
                if r.status_code == 200:
                    break
                if r.status_code != 503:
                    raise RuntimeError(f"/health answered {r.status_code}")
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"server not healthy in time: {self.output()}")
        self.client = openai.OpenAI(
            base_url=self.base + "/v1", api_key=self.api_key, max_retries=0, timeout=300
        )

    def output(self):
        self.log.seek(0)
        return self.log.read()[-3000:]

    def metrics(self):
        port = self.metrics_port or self.port
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                samples[key] = s.value
        return samples

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def metric(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test(fn):
    """Runs a test, records the outcome; the server must still answer afterwards."""
    started = time.time()
    try:
        fn()
        RESULTS["passed"] += 1
        print(f"PASS {fn.__name__} ({time.time() - started:.1f}s)", flush=True)
    except Exception:  # noqa: BLE001 - report every failure and carry on
        RESULTS["failed"] += 1
        print(f"FAIL {fn.__name__} ({time.time() - started:.1f}s)", flush=True)
        traceback.print_exc()
    return fn


def cli_generate(prompt, chat, max_tokens, flags=("--temperature", "0")):
    """The same request through `marlin generate --json`: Engine::generate, the reference."""
    cmd = [BIN, "generate", "--prompt", prompt, "--max-tokens", str(max_tokens), "--json",
           *flags]
    if chat:
        cmd.append("--chat")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def chat(client, content, max_tokens, stream=False, **kw):
    """Greedy chat; returns (text, finish_reason, usage)."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage = "", None, None
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, **kw)
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


def complete(client, prompt, max_tokens, stream=False, **kw):
    if not stream:
        r = client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=max_tokens, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    text, finish, usage = "", None, None
    for chunk in client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


TOPICS = ["the sea", "a cat", "mountains", "coffee", "rain", "the moon", "a robot", "autumn",
          "bread", "music", "a river", "snow", "a library", "the desert", "bees", "trains"]
PROMPTS = [f"Write one sentence about {t}." for t in TOPICS] + \
          [f"Name three things about {t}." for t in TOPICS]
CONCURRENT_TOKENS = 24


def main():
    a = Server()
    b = Server("--num-kv-blocks", "12", "--block-size", "16", metrics_port=True,
               api_key="sekret")
    servers = [a, b]
    alone = {}
    try:
        client = a.client

        @test
        def health_and_models():
            assert a.health_codes <= {200, 503}, a.health_codes
            models = client.models.list()
            assert [m.id for m in models.data] == [MODEL]
            r = httpx.get(a.base + "/v1/models/" + MODEL).json()
            assert r["id"] == MODEL and r["max_model_len"] == 8192, r

        @test
        def chat_matches_generate_and_usage():
            prompt = "Write a haiku about the sea."
            ref = cli_generate(prompt, chat=True, max_tokens=32)
            text, finish, usage = chat(client, prompt, 32)
            assert text == ref["text"], (text, ref["text"])
            assert finish == ref["finish_reason"], (finish, ref)
            assert usage.prompt_tokens == ref["prompt_tokens"], (usage, ref)
            assert usage.completion_tokens == ref["completion_tokens"], (usage, ref)
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

        @test
        def chat_streaming_equals_non_streaming():
            prompt = "What is the capital of France?"
            text, finish, usage = chat(client, prompt, 24)
            s_text, s_finish, s_usage = chat(client, prompt, 24, stream=True)
            assert (s_text, s_finish) == (text, finish), (s_text, text)
            assert s_usage.model_dump() == usage.model_dump(), (s_usage, usage)
            # The raw stream: a role delta first, [DONE] last, ids stable.
            with httpx.stream("POST", a.base + "/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 4, "temperature": 0, "stream": True}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                lines = [l for l in r.iter_lines() if l]
            assert lines[-1] == "data: [DONE]", lines[-1]
            chunks = [json.loads(l[len("data: "):]) for l in lines[:-1]]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert len({c["id"] for c in chunks}) == 1
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"

        @test
        def completions_match_generate():
            prompt = "The capital of France is"
            ref = cli_generate(prompt, chat=False, max_tokens=16)
            text, finish, usage = complete(client, prompt, 16)
            assert text == ref["text"], (text, ref)
            assert (usage.prompt_tokens, usage.completion_tokens) == \
                (ref["prompt_tokens"], ref["completion_tokens"])
            s_text, s_finish, s_usage = complete(client, [prompt], 16, stream=True)
            assert (s_text, s_finish) == (text, finish)
            assert s_usage.model_dump() == usage.model_dump()

        @test
        def max_tokens_gives_length():
            text, finish, usage = complete(client, "Once upon a time", 5, extra_body={"ignore_eos": True})
            assert finish == "length" and usage.completion_tokens == 5, (finish, usage)
            _, finish, usage = chat(client, "Tell me a long story.", 7,)
            assert finish == "length" and usage.completion_tokens == 7, (finish, usage)
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
                temperature=0, max_completion_tokens=3)
            assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"

        @test
        def stop_sequences():
            full, _, _ = complete(client, "1, 2, 3, 4,", 20)
            cut = full.index("7")
            for stop in ["7", ["xyz", "7"]]:
                text, finish, usage = complete(client, "1, 2, 3, 4,", 20, stop=stop)
                assert text == full[:cut] and finish == "stop", (text, full, finish)
                assert usage.completion_tokens < 20
                s_text, s_finish, _ = complete(client, "1, 2, 3, 4,", 20, stop=stop, stream=True)
                assert (s_text, s_finish) == (text, finish)

        @test
        def seeded_sampling_is_reproducible():
            kw = dict(model=MODEL, prompt="My favourite colour is", max_tokens=12,
                      temperature=0.9, top_p=0.9, seed=1234,
                      presence_penalty=0.5, frequency_penalty=0.3,
                      extra_body={"repetition_penalty": 1.1, "top_k": 40, "min_p": 0.01})
            one = client.completions.create(**kw).choices[0].text
            two = client.completions.create(**kw).choices[0].text
            assert one == two, (one, two)
            # Without the additive penalties the CLI can express it: Engine::generate agrees.
            del kw["presence_penalty"], kw["frequency_penalty"]
            served = client.completions.create(**kw).choices[0].text
            ref = cli_generate(kw["prompt"], False, 12, flags=(
                "--temperature", "0.9", "--top-p", "0.9", "--top-k", "40", "--min-p", "0.01",
                "--repetition-penalty", "1.1", "--seed", "1234"))
            assert served == ref["text"], (served, ref["text"])

        @test
        def concurrent_streams_match_alone():
            for p in PROMPTS:
                alone[p] = chat(client, p, CONCURRENT_TOKENS)[:2]
            before = a.metrics()
            started = time.time()
            with futures.ThreadPoolExecutor(32) as pool:
                got = list(pool.map(
                    lambda p: chat(client, p, CONCURRENT_TOKENS, stream=True), PROMPTS))
            took = time.time() - started
            for p, (text, finish, usage) in zip(PROMPTS, got):
                assert (text, finish) == alone[p], (p, text, alone[p])
            after = a.metrics()
            done = sum(metric(after, "marlin:request_success_total", finished_reason=r)
                       - metric(before, "marlin:request_success_total", finished_reason=r)
                       for r in ("stop", "length"))
            assert done == 32, done
            gen = metric(after, "marlin:generation_tokens_total") - \
                metric(before, "marlin:generation_tokens_total")
            assert gen == sum(u.completion_tokens for _, _, u in got), gen
            prompt = metric(after, "marlin:prompt_tokens_total") - \
                metric(before, "marlin:prompt_tokens_total")
            assert prompt == sum(u.prompt_tokens for _, _, u in got), prompt
            print(f"  32 concurrent streams in {took:.1f}s, {gen:.0f} tokens")

        @test
        def preemption_keeps_every_request_correct():
            # 12 blocks of 16 tokens: one request fits, eight at once do not.
            prompts = PROMPTS[:8]
            before = b.metrics()
            with futures.ThreadPoolExecutor(8) as pool:
                got = list(pool.map(
                    lambda p: chat(b.client, p, CONCURRENT_TOKENS, stream=True), prompts))
            for p, (text, finish, _) in zip(prompts, got):
                want = alone.get(p) or chat(client, p, CONCURRENT_TOKENS)[:2]
                assert (text, finish) == want, (p, text, want)
            after = b.metrics()
            preempted = metric(after, "marlin:num_preemptions_total") - \
                metric(before, "marlin:num_preemptions_total")
            assert preempted > 0, "no preemption happened"
            assert metric(after, "marlin:kv_cache_usage_perc") == 0.0
            print(f"  {preempted:.0f} preemptions")

        @test
        def disconnect_frees_blocks():
            before = a.metrics()
            with httpx.stream("POST", a.base + "/v1/completions", json={
                    "model": MODEL, "prompt": "Count to a thousand: 1, 2,", "max_tokens": 4000,
                    "temperature": 0, "stream": True, "ignore_eos": True}, timeout=60) as r:
                seen = 0
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen += 1
                    if seen == 5:
                        break
            # The response is closed; the scheduler must notice and free the blocks.
            deadline = time.time() + 15
            while time.time() < deadline:
                m = a.metrics()
                if metric(m, "marlin:kv_cache_usage_perc") == 0 and \
                        metric(m, "marlin:num_requests_running") == 0:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"blocks still in use: {metric(m, 'marlin:kv_cache_usage_perc')}")
            aborted = metric(m, "marlin:request_success_total", finished_reason="abort") - \
                metric(before, "marlin:request_success_total", finished_reason="abort")
            assert aborted == 1, aborted
            gen = metric(m, "marlin:generation_tokens_total") - \
                metric(before, "marlin:generation_tokens_total")
            assert 5 <= gen < 4000, gen

        bad_requests = []

        def expect_error(server, path, body, status, param=None, headers=None, raw=None):
            h = {"Authorization": f"Bearer {server.api_key}"}
            h.update(headers or {})
            if raw is not None:
                r = httpx.post(server.base + path, content=raw, headers=h, timeout=60)
            else:
                r = httpx.post(server.base + path, json=body, headers=h, timeout=60)
            assert r.status_code == status, (body or raw, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert isinstance(err["message"], str) and err["message"], err
            if param is not None:
                assert err["param"] == param, (param, err)
            bad_requests.append((path, status))
            # ... and the server keeps serving.
            ok = httpx.get(server.base + "/health", timeout=10)
            assert ok.status_code == 200

        msgs = [{"role": "user", "content": "hi"}]
        C, P = "/v1/chat/completions", "/v1/completions"

        @test
        def malformed_requests_are_400():
            before = a.metrics()
            bad_requests.clear()
            expect_error(a, C, None, 400, raw=b"{not json")
            expect_error(a, C, None, 400, raw=b"")
            expect_error(a, C, None, 400, raw=b"[1, 2]")
            expect_error(a, C, None, 400, raw=b"\xff\xfe")
            expect_error(a, C, {"model": MODEL}, 400, "messages")
            expect_error(a, C, {"model": MODEL, "messages": []}, 400, "messages")
            expect_error(a, C, {"model": MODEL, "messages": "hi"}, 400, "messages")
            expect_error(a, C, {"model": MODEL, "messages": [{"role": "user"}]}, 400)
            expect_error(a, C, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400)
            expect_error(a, C, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400)
            expect_error(a, C, {"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400)
            expect_error(a, C, {"model": 7, "messages": msgs}, 400, "model")
            for field, value in [("temperature", "hot"), ("temperature", -1), ("temperature", 5),
                                 ("top_p", 0), ("top_p", 1.5), ("top_k", -5), ("top_k", 1.5),
                                 ("min_p", 2), ("repetition_penalty", 0),
                                 ("presence_penalty", 3), ("frequency_penalty", -3),
                                 ("max_tokens", 0), ("max_tokens", "ten"),
                                 ("max_completion_tokens", -1), ("seed", "x"), ("stream", "yes"),
                                 ("stop", 5), ("stop", [1, 2])]:
                expect_error(a, C, {"model": MODEL, "messages": msgs, field: value}, 400, field)
            for field, value in [("n", 2), ("logprobs", True), ("top_logprobs", 3),
                                 ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                 ("tool_choice", "required"),
                                 ("response_format", {"type": "json_object"}),
                                 ("logit_bias", {"50": 10})]:
                expect_error(a, C, {"model": MODEL, "messages": msgs, field: value}, 400, field)
            for field, value in [("best_of", 2), ("echo", True), ("logprobs", 2), ("n", 3),
                                 ("suffix", "end")]:
                expect_error(a, P, {"model": MODEL, "prompt": "x", field: value}, 400, field)
            expect_error(a, P, {"model": MODEL}, 400, "prompt")
            expect_error(a, P, {"model": MODEL, "prompt": ""}, 400)
            expect_error(a, P, {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt")
            expect_error(a, P, {"model": MODEL, "prompt": {"text": "a"}}, 400, "prompt")
            expect_error(a, P, {"model": MODEL, "prompt": [[1, -2]]}, 400, "prompt")
            expect_error(a, P, {"model": MODEL, "prompt": [10 ** 9]}, 400, "prompt")
            expect_error(a, P, {"model": MODEL, "prompt": "hello " * 9000}, 400, "prompt")
            expect_error(a, C, {"model": MODEL, "messages": [
                {"role": "user", "content": "hello " * 9000}]}, 400, "messages")
            # A prompt longer than the whole KV cache of server b (192 tokens).
            expect_error(b, P, {"model": MODEL, "prompt": "hello " * 300}, 400, "prompt")
            after = a.metrics()
            n400 = metric(after, "marlin:http_requests_total", route=C, status="400") + \
                metric(after, "marlin:http_requests_total", route=P, status="400") - \
                metric(before, "marlin:http_requests_total", route=C, status="400") - \
                metric(before, "marlin:http_requests_total", route=P, status="400")
            sent = sum(1 for path, status in bad_requests[:-1] if status == 400)
            assert n400 == sent, (n400, sent)

        @test
        def unknown_model_route_and_harmless_fields():
            expect_error(a, C, {"model": "gpt-4", "messages": msgs}, 404, "model")
            expect_error(a, P, {"model": "nope", "prompt": "x"}, 404, "model")
            r = httpx.get(a.base + "/v1/models/nope")
            assert r.status_code == 404 and "error" in r.json()
            r = httpx.get(a.base + "/v2/whatever")
            assert r.status_code == 404 and "error" in r.json()
            r = httpx.post(a.base + C, json={
                "model": MODEL, "messages": msgs, "max_tokens": 2, "user": "me", "foo": [1],
                "metadata": {"a": "b"}, "store": False, "n": 1, "logprobs": False,
                "response_format": {"type": "text"}, "tools": [], "parallel_tool_calls": True,
                "stream_options": None, "temperature": None,
                "messages_extra": 1})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] <= 2

        @test
        def api_key_is_required_when_set():
            r = httpx.get(b.base + "/v1/models")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = httpx.get(b.base + "/v1/models", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            with_key = openai.OpenAI(base_url=b.base + "/v1", api_key="wrong", max_retries=0)
            try:
                with_key.models.list()
                raise AssertionError("a wrong key was accepted")
            except openai.AuthenticationError:
                pass
            assert [m.id for m in b.client.models.list().data] == [MODEL]
            assert httpx.get(b.base + "/health").status_code == 200

        @test
        def metrics_parse_and_separate_port():
            m = b.metrics()  # parsed strictly by prometheus_client
            names = {name for name, _ in m}
            for want in ["marlin:num_requests_running", "marlin:num_requests_waiting",
                         "marlin:kv_cache_usage_perc", "marlin:num_preemptions_total",
                         "marlin:prompt_tokens_total", "marlin:generation_tokens_total",
                         "marlin:time_to_first_token_seconds_count",
                         "marlin:inter_token_latency_seconds_bucket",
                         "marlin:e2e_request_latency_seconds_sum",
                         "marlin:http_requests_total", "marlin:request_success_total"]:
                assert want in names, (want, sorted(names))
            # On b, /metrics lives on the metrics port only.
            assert httpx.get(b.base + "/metrics").status_code == 404

        @test
        def metrics_count_requests():
            before = a.metrics()
            usages = [complete(client, f"Fact number {i}:", 6)[2] for i in range(3)]
            usages.append(chat(client, "Say hi.", 6, stream=True)[2])
            after = a.metrics()
            d = lambda name, **l: metric(after, name, **l) - metric(before, name, **l)
            assert d("marlin:http_requests_total", route=P, status="200") == 3
            assert d("marlin:http_requests_total", route=C, status="200") == 1
            assert d("marlin:request_success_total", finished_reason="stop") + \
                d("marlin:request_success_total", finished_reason="length") == 4
            assert d("marlin:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
            assert d("marlin:generation_tokens_total") == sum(u.completion_tokens for u in usages)
            assert d("marlin:e2e_request_latency_seconds_count") == 4
            assert d("marlin:time_to_first_token_seconds_count") == 4
            assert d("marlin:inter_token_latency_seconds_count") == \
                sum(u.completion_tokens - 1 for u in usages)
            assert metric(after, "marlin:num_requests_running") == 0

        @test
        def shared_prefix_is_reused_with_the_same_answer():
            # A prompt longer than one KV block, sent twice: the second request finds the
            # first one's full blocks in the prefix cache and must answer the same.
            prompt = "Here is a list of the planets of the solar system, in order: " * 3
            before = a.metrics()
            first = complete(client, prompt, 12)[0]
            mid = a.metrics()
            second = complete(client, prompt, 12)[0]
            after = a.metrics()
            assert first == second, (first, second)
            hits = lambda m: metric(m, "marlin:prefix_cache_hits_total")
            queries = lambda m: metric(m, "marlin:prefix_cache_queries_total")
            assert hits(after) - hits(mid) >= 32, "the second request reused no blocks"
            assert queries(after) - queries(mid) == queries(mid) - queries(before) > 32

        @test
        def full_queue_answers_503():
            c = Server("--max-num-seqs", "1", "--max-queue", "1")
            servers.append(c)
            body = {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 48,
                    "temperature": 0, "ignore_eos": True}
            with futures.ThreadPoolExecutor(5) as pool:
                rs = list(pool.map(lambda _: httpx.post(c.base + P, json=body, timeout=120),
                                   range(5)))
            codes = sorted(r.status_code for r in rs)
            assert set(codes) <= {200, 503} and codes.count(503) >= 2 and 200 in codes, codes
            for r in rs:
                if r.status_code == 503:
                    assert r.json()["error"]["message"], r.text
            assert httpx.post(c.base + P, json=body, timeout=120).status_code == 200
            m = c.metrics()
            assert metric(m, "marlin:http_requests_total", route=P, status="503") == codes.count(503)
    finally:
        for s in servers:
            s.close()
        if RESULTS["failed"]:
            for s in servers:
                print(f"--- server log (port {s.port}) ---\n{s.output()}")

    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
