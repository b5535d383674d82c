"""N concurrent streaming clients against `edgellm serve` on loopback.

Starts `edgellm serve MODEL` on 127.0.0.1 (a free port) in a child process and runs N client
threads at once, each holding its own multi-turn chat (every request adds the previous answer and a
new user message, so the server's KV prefix reuse is exercised; a chat that would outgrow the
context starts over). The clients' first turns are the warm-up; then each sends R more streamed
requests, which are measured. Reports per client: time to first token (from sending the
request to the first content chunk; it includes the wait in the server's queue, since the model
runs one generation at a time), decode tokens/s as the client sees them (tokens after the first /
time from the first to the last), prompt tokens and how many of them the server found in its KV
caches, errors (must be zero); and the server's resident memory after the warm-up and after the
run (no growth expected: KV caches are allocated once). Bounded: at most 64 clients, 100 requests
each, and a wall-clock limit.

    python benchmarks/serve.py                       # demo model, 4 clients x 3 requests
    python benchmarks/serve.py --clients 8 --requests 5 --json serve.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from serveclient import DONE, free_port, sse_data, wait_healthy

TOPICS = ["the weather", "a long walk", "the library", "a letter", "the garden", "music",
          "an old friend", "the sea"]


def rss_mb(pid):
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e6


def start_server(model, port, queue_size, log):
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--queue-size", str(queue_size), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    if wait_healthy(f"http://127.0.0.1:{port}", proc, 180):
        return proc
    if proc.poll() is not None:
        raise SystemExit(f"edgellm serve exited with {proc.returncode} (see {log.name})")
    proc.kill()
    raise SystemExit("edgellm serve did not start in 180 s")


def stream_chat(client, url, messages, max_tokens, deadline):
    """One streamed chat request: (answer, ttft_s, completion_tokens, decode_s, usage)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "seed": 1,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, parts, usage, done = None, [], None, False
    timeout = max(1.0, deadline - time.monotonic())
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:200]}")
        for line in r.iter_lines():
            chunk = sse_data(line)
            if chunk is None:
                continue
            if chunk == DONE:
                done = True
                break
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                piece = c["delta"].get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(piece)
    end = time.perf_counter()
    if not done or usage is None:
        raise RuntimeError("the stream ended without usage and [DONE]")
    return "".join(parts), (first or end) - t0, usage["completion_tokens"], end - (first or end), \
        usage


def client_run(i, url, requests, max_tokens, n_ctx, deadline, out, messages):
    """Client i continues its chat `messages` for `requests` streamed requests."""
    import httpx

    rec = {"client": i, "requests": 0, "errors": 0, "ttft_s": [], "tokens": 0, "decode_s": 0.0,
           "tokens_after_first": 0, "prompt_tokens": 0, "cached_tokens": 0, "error_messages": []}
    with httpx.Client() as client:
        for k in range(len(messages), len(messages) + requests):
            if time.monotonic() > deadline:
                break
            messages.append({"role": "user",
                             "content": f"Tell me more about {TOPICS[(i + k) % len(TOPICS)]}."})
            try:
                text, ttft, n, decode, usage = stream_chat(client, url, messages, max_tokens,
                                                           deadline)
            except Exception as e:  # counted, reported; the benchmark goes on
                rec["errors"] += 1
                rec["error_messages"].append(f"{type(e).__name__}: {e}")
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": text})
            prompt = usage["prompt_tokens"]
            rec["prompt_tokens"] += prompt
            rec["cached_tokens"] += usage["prompt_tokens_details"]["cached_tokens"]
            if prompt + n + 2 * max_tokens + 32 > n_ctx:  # the next turn might not fit
                del messages[1:]
            rec["requests"] += 1
            rec["ttft_s"].append(ttft)
            rec["tokens"] += n
            rec["decode_s"] += decode
            rec["tokens_after_first"] += max(0, n - 1)
    out[i] = rec


def main():
    from edgellm.cli import demo_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=demo_model_path(), help="model directory (default: demo)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (1..64)")
    ap.add_argument("--requests", type=int, default=3, help="requests per client (1..100)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--time-limit", type=float, default=300, help="stop sending after this "
                    "many seconds (default 300)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = ap.parse_args()
    if not 1 <= a.clients <= 64 or not 1 <= a.requests <= 100:
        ap.error("--clients must be 1..64 and --requests 1..100")

    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="edgellm-serve-")
    proc = start_server(a.model, port, max(8, a.clients), log)
    try:
        deadline = time.monotonic() + a.time_limit
        n_ctx = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["context_length"]
        chats = [[{"role": "system", "content": "You are a helpful assistant."}]
                 for _ in range(a.clients)]

        def run(requests):
            out = {}
            threads = [threading.Thread(target=client_run, args=(
                i, url, requests, a.max_tokens, n_ctx, deadline, out, chats[i]))
                for i in range(a.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return out, time.perf_counter() - t0

        warm, _ = run(1)  # each client's first turn: compiled kernels, KV caches allocated
        rss_before = rss_mb(proc.pid)
        out, wall = run(a.requests)
        rss_after = rss_mb(proc.pid)
        health = httpx.get(url + "/health", timeout=10).json()
    finally:
        proc.send_signal(2)  # SIGINT: the server's clean shutdown
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    rows = [out[i] for i in range(a.clients)]
    warm_errors = sum(r["errors"] for r in warm.values())
    print(f"edgellm serve benchmark: {os.path.basename(os.path.normpath(a.model))}, "
          f"{a.clients} clients x {a.requests} streamed chat requests, max_tokens "
          f"{a.max_tokens}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'client':>6} {'ok':>4} {'err':>4} {'ttft mean ms':>13} {'ttft max ms':>12} "
          f"{'tokens':>7} {'decode tok/s':>13} {'prompt tok':>11} {'cached':>7}")
    for r in rows:
        tt = r["ttft_s"] or [float("nan")]
        tps = r.get("tokens_after_first", 0) / r["decode_s"] if r["decode_s"] else float("nan")
        r["ttft_mean_ms"] = 1e3 * sum(tt) / len(tt)
        r["ttft_max_ms"] = 1e3 * max(tt)
        r["decode_tokens_per_s"] = tps
        print(f"{r['client']:>6} {r['requests']:>4} {r['errors']:>4} {r['ttft_mean_ms']:>13.1f} "
              f"{r['ttft_max_ms']:>12.1f} {r['tokens']:>7} {tps:>13.1f} {r['prompt_tokens']:>11} "
              f"{r['cached_tokens']:>7}")
    tokens = sum(r["tokens"] for r in rows)
    errors = sum(r["errors"] for r in rows) + warm_errors
    summary = {"clients": a.clients, "requests_per_client": a.requests,
               "max_tokens": a.max_tokens, "wall_s": wall, "tokens": tokens,
               "aggregate_tokens_per_s": tokens / wall if wall else 0.0, "errors": errors,
               "rss_mb_before": rss_before, "rss_mb_after": rss_after,
               "server": health, "clients_detail": rows}
    print(f"total: {tokens} tokens in {wall:.2f} s = {summary['aggregate_tokens_per_s']:.1f} "
          f"tokens/s across clients; errors {errors}; server RSS {rss_before:.1f} MB -> "
          f"{rss_after:.1f} MB ({rss_after - rss_before:+.1f} MB)")
    for r in rows:
        for m in r["error_messages"]:
            print(f"  client {r['client']} error: {m}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
