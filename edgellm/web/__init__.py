"""The chat page of `edgellm serve` and the route that feeds its runtime panel.

GET / is static/index.html; /web/ serves static/ (app.js, style.css). No build step and nothing
from a CDN: the page works with no internet access. GET /v1/edgellm/stats (under /v1, so it needs
the API key when the server has one) returns the figures the panel draws; docs/SERVER.md defines
its JSON.
"""

import os
import time
from pathlib import Path

STATIC = Path(__file__).parent / "static"
STEPS = 200  # most recent forward steps sent for the charts

# The page loads only its own files and talks only to this server: even if markup got past the
# page's Markdown renderer, no inline script or outside resource could run or load.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


def add_routes(app, v1, model, engine, name):
    """The page on `app`, the stats route on the /v1 router `v1` (call before including it)."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=headers)

    # a mount at "/" would shadow the API's 404/405 answers: the files live under /web/
    app.mount("/web", StaticFiles(directory=STATIC), name="web")

    @v1.get("/edgellm/stats", summary="the runtime figures of the chat page's panel")
    async def edgellm_stats():
        return stats(model, engine, name)


def rss_bytes():
    """The process's resident memory now (Linux /proc), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def generation(model, running):
    """The latest generation's figures from Model.last_stats, which the worker thread fills in
    while it runs: prefill_s once the prompt is done, decode_s when the answer ends (a stopped
    answer never gets it)."""
    from ..model import stats_summary

    s = dict(model.last_stats or {})  # a copy: the worker adds keys as it goes
    if not s:
        return None
    done = "decode_s" in s
    state = "done" if done else ("running" if running else "stopped")
    rates = stats_summary(s)
    return {
        "state": state,
        "prompt_tokens": s["prompt_tokens"], "cached_tokens": s.get("cached_tokens", 0),
        "completion_tokens": s.get("generated_tokens", 0),
        "prefill_s": s.get("prefill_s"), "decode_s": s.get("decode_s"),
        "prefill_tokens_per_s": rates["prefill_tokens_per_s"] if "prefill_s" in s else None,
        "decode_tokens_per_s": rates["decode_tokens_per_s"] if done else None,
        "finish_reason": s.get("finish_reason") if done else None,
    }


def flash(stream):
    """Reads from flash under a DRAM budget, for the latest generation (None without one)."""
    if stream is None:
        return None
    f = stream.summary()
    steps = f["per_step"]
    first = max(0, len(steps) - STEPS)
    return {
        "mode": f["mode"], "dram_budget_bytes": f["dram_budget_bytes"],
        "plan_bytes": f["plan_bytes"], "allocated_bytes": f["allocated_bytes"],
        "bytes_read": f["bytes_read"], "bytes_read_per_token": f["bytes_read_per_token"],
        "neurons_loaded_per_token": f["neurons_loaded_per_token"], "hit_rate": f["hit_rate"],
        "decode_from_step": f["decode_from_step"], "first_step": first,
        "steps": [{"tokens": s["tokens"], "bytes_read": s["bytes_read"],
                   "neurons_active": s["neurons_active"], "hits": s["hits"],
                   "wall_s": s["wall_s"]} for s in steps[first:]],
    }


def stats(model, engine, name):
    """The JSON of GET /v1/edgellm/stats (docs/SERVER.md)."""
    running = engine.running is not None
    try:
        fl = flash(model.stream)
    except RuntimeError:  # a dict the worker grew while we read it: the next poll gets it
        fl = None
    return {
        "object": "edgellm.stats", "model": name, "time": time.time(), "running": running,
        "waiting": engine.queue.qsize(),
        "generations": sum(engine.counts[k] for k in ("completed", "cancelled", "failed")),
        "last": generation(model, running),
        "memory": {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(),
                   "kv_cache_bytes": sum(c.nbytes() for c in list(engine.pool.caches)),
                   "dram_budget_bytes": model.plan.budget if model.plan is not None else None,
                   "weights_load": model.weights["load"]},
        "flash": fl,
    }
