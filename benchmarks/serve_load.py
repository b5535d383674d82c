"""edgellm serve under load and faults (issue 9, part 4): the long version of
tests/test_server_load.py.

    python benchmarks/serve_load.py [--clients 100] [--requests 10000] [--model DIR]

The server runs in this process (uvicorn in a thread, as `edgellm serve` runs it) so that its
model can be watched: when each piece of each generation is produced and when each job is
cancelled. The clients run in a child process (asyncio + httpx), so they do not share the
server's GIL. Three phases:

1. --clients concurrent streaming clients (default 100), half of them hanging up at a random
   point (while waiting, or after 1..20 pieces). The others must all get their whole stream
   (finish_reason, [DONE], no error event). For each that hung up while running: pieces produced
   after it closed its connection, and after the server cancelled its job (the worker checks
   between pieces: at most 1), and the delay from hang-up to the generation's end, next to the
   model's time per token.
2. --requests short requests (max_tokens 4; chat and completions, streamed or not, 1 in 10 a
   hang-up) from 16 concurrent clients; the server's RSS before (after a warm-up) and after, and
   every 1000 requests.
3. A server with --queue-size 4, one long generation running and 4 waiting: 20 more requests,
   each must get 503 with Retry-After.

Prints the figures and a JSON summary (--json FILE writes it). Exit 1 on any failure.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time

from serveclient import DONE, free_port, sse_data

PROMPT = "It is a truth universally acknowledged"


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
# The server side (this process)


class Watch:
    """Piece and cancel times per prompt (token ids), from a wrapped model.generate and
    Job.cancel."""

    def __init__(self, model, server):
        self.pieces, self.closed, self.cancelled, self.on = {}, {}, {}, True
        real, real_cancel = model.generate, server.Job.cancel

        def generate(prompt, *args, **kwargs):
            key = tuple(prompt)
            times = self.pieces.setdefault(key, []) if self.on else []
            gen = real(prompt, *args, **kwargs)
            try:
                for piece in gen:
                    times.append(time.monotonic())
                    yield piece
            finally:
                gen.close()
                if self.on:
                    self.closed[key] = time.monotonic()

        def cancel(job, *args, **kwargs):
            if self.on:
                self.cancelled.setdefault(tuple(job.ids), time.monotonic())
            return real_cancel(job, *args, **kwargs)

        model.generate = generate
        server.Job.cancel = cancel


class Running:
    def __init__(self, app, port):
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                 log_level="critical"))
        self.thread = threading.Thread(target=self.srv.run, daemon=True)
        self.thread.start()
        while not self.srv.started:
            if not self.thread.is_alive():
                sys.exit("the server did not start")
            time.sleep(0.02)

    def stop(self):
        self.srv.should_exit = True
        self.thread.join(30)


# ---------------------------------------------------------------------------------------------
# The client side (a child process)


async def one_stream(client, url, body, hang_after, chat):
    """-> dict: status, pieces, done, finish, errors, closed (monotonic time of the hang-up)."""
    out = {"status": None, "pieces": 0, "done": False, "finish": None, "errors": [],
           "closed": None}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        async with client.stream("POST", url + path, json=body) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["errors"].append((await r.aread()).decode()[:200])
                return out
            if hang_after == 0:  # leave while waiting in the queue
                out["closed"] = time.monotonic()
                return out
            async for line in r.aiter_lines():
                event = sse_data(line)
                if event is None:
                    continue
                if event == DONE:
                    out["done"] = True
                    break
                if "error" in event:
                    out["errors"].append(event["error"])
                    continue
                if not event["choices"]:
                    continue
                c = event["choices"][0]
                text = c["delta"].get("content") if chat else c["text"]
                if text:
                    out["pieces"] += 1
                out["finish"] = c["finish_reason"] or out["finish"]
                if hang_after is not None and out["pieces"] >= hang_after:
                    out["closed"] = time.monotonic()
                    break
    except Exception as e:  # noqa: BLE001 (every failure is a figure here)
        out["errors"].append(f"{type(e).__name__}: {e}")
    return out


async def phase_streams(url, n, seed):
    import httpx

    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        plan = []
        for i in range(n):
            hang = None if rng.random() < 0.5 else rng.choice([0] + list(range(1, 21)))
            body = {"prompt": f"{i}. {PROMPT}", "max_tokens": rng.randint(24, 64),
                    "temperature": 0.8, "seed": i, "stream": True}
            plan.append((body, hang))
        results = await asyncio.gather(*(one_stream(client, url, b, h, False) for b, h in plan))
    return [{"prompt": b["prompt"], "hang": h, **r} for (b, h), r in zip(plan, results)]


async def phase_many(url, total, seed, report_every, conn, seconds):
    import httpx

    rng = random.Random(seed)
    counts = {"ok": 0, "errors": 0, "hung_up": 0}
    errors = []
    limits = httpx.Limits(max_connections=32)
    done, deadline = 0, time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(k):
            nonlocal done
            while done < total and time.monotonic() < deadline:
                done += 1
                i = done
                chat, stream = rng.random() < 0.5, rng.random() < 0.5
                hang = 1 if stream and rng.random() < 0.1 else None
                body = {"max_tokens": 4, "temperature": 0.7, "stream": stream}
                if chat:
                    body["messages"] = [{"role": "user", "content": f"Say something, {i}"}]
                else:
                    body["prompt"] = f"{PROMPT} {i}"
                if stream:
                    r = await one_stream(client, url, body, hang, chat)
                    ok = not r["errors"] and (r["done"] or hang)
                    counts["hung_up"] += bool(hang)
                else:
                    path = "/v1/chat/completions" if chat else "/v1/completions"
                    try:
                        resp = await client.post(url + path, json=body)
                        ok = resp.status_code == 200 and \
                            resp.json()["usage"]["completion_tokens"] >= 1
                        r = {"errors": [] if ok else [resp.text[:200]]}
                    except Exception as e:  # noqa: BLE001
                        ok, r = False, {"errors": [f"{type(e).__name__}: {e}"]}
                counts["ok" if ok else "errors"] += 1
                if not ok and len(errors) < 10:
                    errors.append(r["errors"])
                if i % report_every == 0:
                    conn.send(("progress", i))
                    await asyncio.to_thread(conn.recv)  # the server side measures its RSS

        await asyncio.gather(*(worker(k) for k in range(16)))
    return {**counts, "sent": done, "first_errors": errors}


async def phase_busy(url, long_tokens):
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        body = {"prompt": PROMPT, "max_tokens": long_tokens, "temperature": 0, "stream": True}
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.aiter_lines()
            await lines.__anext__()  # running
            waiting = [asyncio.ensure_future(client.post(url + "/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 2})) for _ in range(4)]
            while (await client.get(url + "/health")).json()["waiting"] < 4:
                await asyncio.sleep(0.01)
            refused = [await client.post(url + "/v1/completions", json={"prompt": PROMPT})
                       for _ in range(20)]
        waited = await asyncio.gather(*waiting)
    return {"refused": [(r.status_code, r.headers.get("retry-after"),
                         r.json()["error"]["code"]) for r in refused],
            "waiting_then_served": [r.status_code for r in waited]}


def client_main(conn, url, url_busy, args):
    streams = asyncio.run(phase_streams(url, args.clients, args.seed))
    conn.send(("streams", streams))
    conn.recv()
    many = asyncio.run(phase_many(url, args.requests, args.seed,
                                  min(1000, max(1, args.requests // 10)), conn, args.seconds))
    conn.send(("many", many))
    busy = asyncio.run(phase_busy(url_busy, 400))
    conn.send(("busy", busy))


# ---------------------------------------------------------------------------------------------


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the demo model)")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=1e9,
                    help="phase 2 sends no new request after this long (a loaded machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import logging

    class Count(logging.Handler):  # asyncio's warnings (e.g. "socket.send() raised exception."
        def __init__(self):  # after a hang-up: writes to a lost connection) are counted: none
            super().__init__(logging.WARNING)  # may appear
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logged = Count()
    logging.getLogger("asyncio").addHandler(logged)
    import edgellm
    from edgellm import server
    from edgellm.cli import demo_model_path

    path = args.model or demo_model_path()
    model = edgellm.load(path)
    model.warmup()
    watch = Watch(model, server)
    app = server.create_app(model, "m", queue_size=max(args.clients, 16) + 8)
    busy_app = server.create_app(edgellm.load(path), "m", queue_size=4)
    main_srv, busy_srv = Running(app, free_port()), Running(busy_app, free_port())
    engine = app.state.engine
    failures = []
    summary = {"model": os.path.basename(os.path.normpath(path)), "clients": args.clients,
               "requests": args.requests}

    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=client_main,
                                           args=(child, main_srv.url, busy_srv.url, args))
    t0 = time.monotonic()
    proc.start()
    try:
        # --- phase 1
        kind, streams = parent.recv()
        t1 = time.monotonic()
        stayed = [s for s in streams if s["hang"] is None]
        bad = [s for s in stayed if s["errors"] or not s["done"] or s["finish"] is None]
        left_running = [s for s in streams if s["hang"] and s["closed"] is not None]  # hang > 0
        after_close, after_cancel, delay_ms = [], [], []
        for s in left_running:
            key = tuple(model.tokenizer.encode(s["prompt"]))
            times = watch.pieces.get(key, [])
            after_close.append(sum(t > s["closed"] for t in times))
            if key in watch.cancelled:
                after_cancel.append(sum(t > watch.cancelled[key] for t in times))
            if key in watch.closed:
                delay_ms.append(1000 * (watch.closed[key] - s["closed"]))
        gaps = [1000 * (b - a) for t in watch.pieces.values() for a, b in zip(t, t[1:])]
        token_ms = statistics.median(gaps) if gaps else float("nan")
        s1 = {"stayed": len(stayed), "stayed_with_errors": len(bad),
              "hung_up": len(streams) - len(stayed),
              "hung_up_while_running": len(left_running),
              "pieces_after_hang_up_max": max(after_close, default=0),
              "pieces_after_hang_up_p50": pct(after_close, 0.5),
              "pieces_after_cancel_max": max(after_cancel, default=0),
              "hang_up_to_generation_end_ms_p50": pct(delay_ms, 0.5),
              "hang_up_to_generation_end_ms_p95": pct(delay_ms, 0.95),
              "hang_up_to_generation_end_ms_max": max(delay_ms, default=float("nan")),
              "token_ms_median": token_ms, "seconds": t1 - t0,
              "engine": dict(engine.counts)}
        summary["streams"] = s1
        print(f"phase 1: {args.clients} streaming clients, {s1['hung_up']} hung up "
              f"({s1['hung_up_while_running']} while running), {s1['stayed']} stayed, "
              f"{len(bad)} of those with errors; pieces produced after a hang-up: max "
              f"{s1['pieces_after_hang_up_max']}, median {s1['pieces_after_hang_up_p50']}; "
              f"after the server cancelled: max {s1['pieces_after_cancel_max']}; hang-up to "
              f"generation end p50 {s1['hang_up_to_generation_end_ms_p50']:.1f} ms, p95 "
              f"{s1['hang_up_to_generation_end_ms_p95']:.1f} ms (a token: {token_ms:.1f} ms); "
              f"{t1 - t0:.0f} s", flush=True)
        if bad:
            failures.append(f"phase 1: {len(bad)} clients that stayed had errors: {bad[:3]}")
        if s1["pieces_after_cancel_max"] > 1:
            failures.append("phase 1: more than one piece after a cancel")
        if engine.counts["failed"]:
            failures.append(f"phase 1: {engine.counts['failed']} generations failed")
        watch.on = False
        watch.pieces.clear()
        import gc

        gc.collect()
        parent.send("go")

        # --- phase 2
        marks = []
        while True:
            kind, value = parent.recv()
            if kind != "progress":
                break
            gc.collect()
            marks.append((value, rss()))
            print(f"  {value} requests: RSS {marks[-1][1] / 1e6:.1f} MB", flush=True)
            parent.send("ok")
        many = value
        t2 = time.monotonic()
        marks.sort()
        first, last = marks[0][1], marks[-1][1]
        summary["many"] = {**many, "rss_first_mark": first, "rss_after_all": last,
                           "rss_marks": marks, "seconds": t2 - t1,
                           "engine": dict(engine.counts)}
        print(f"phase 2: {many['ok'] + many['errors']} of {args.requests} requests, {many['ok']} ok, {many['errors']} errors "
              f"({many['hung_up']} hung up on purpose); RSS after {marks[0][0]} "
              f"{first / 1e6:.1f} MB, "
              f"after {marks[-1][0]} {last / 1e6:.1f} MB ({(last - first) / 1e6:+.1f} MB); "
              f"{t2 - t1:.0f} s", flush=True)
        if many["errors"]:
            failures.append(f"phase 2: {many['errors']} errors: {many['first_errors']}")
        if last - first > 0.1 * first:
            failures.append("phase 2: RSS grew by more than 10%")

        # --- phase 3
        kind, busy = parent.recv()
        summary["busy"] = busy
        ok503 = sum(1 for s, ra, c in busy["refused"] if s == 503 and ra and c == "server_busy")
        print(f"phase 3: queue full: {ok503}/20 answered 503 with Retry-After; the 4 waiting: "
              f"{busy['waiting_then_served']}", flush=True)
        if ok503 != 20 or busy["waiting_then_served"] != [200] * 4:
            failures.append(f"phase 3: {busy}")
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
        main_srv.stop()
        busy_srv.stop()
    summary["asyncio_warnings"] = len(logged.messages)
    print(f"asyncio warnings logged: {len(logged.messages)} "
          f"{sorted(set(logged.messages))[:3] if logged.messages else ''}")
    if logged.messages:
        failures.append(f"{len(logged.messages)} asyncio warnings: {logged.messages[:2]}")
    summary["failures"] = failures
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    print("FAILURES:\n" + "\n".join(failures) if failures else "no failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
