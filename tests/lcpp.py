"""llama.cpp (llama-cpp-python) as a reference engine for tests, run in a child process.

A child process because llama.cpp and edgellm's Numba both start an OpenMP runtime whose wait
policy is fixed by whoever starts it first (see benchmarks/decode.py): in one process one of them
crawls. The child reads a JSON request and writes a JSON answer:

    {"model": FILE.gguf, "n_ctx": N, "jobs": [
        {"kind": "score", "ids": [...], "first": F},   -> {"nll": [...], "top": [...],
                                                             "margin": [...]}
        {"kind": "generate", "ids": [...], "n": N}]}    -> {"tokens": [...]}

score: run ids from an empty context with logits for every position; for each i >= F, the negative
log-likelihood of ids[i] given ids[:i], the top-1 prediction there and its margin over the second
logit (edgellm.evaluate.score, the same arithmetic edgellm's perplexity uses). generate: greedy,
n tokens (stops early at end of generation).

    results = lcpp.run("model.gguf", jobs, n_ctx=1024)
"""

import json
import os
import subprocess
import sys
import tempfile


def available():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def run(model, jobs, n_ctx=1024, threads=2, timeout=600):
    with tempfile.TemporaryDirectory() as d:
        req, out = os.path.join(d, "req.json"), os.path.join(d, "out.json")
        with open(req, "w") as f:
            json.dump({"model": os.fspath(model), "n_ctx": n_ctx, "threads": threads,
                       "jobs": jobs}, f)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), req, out],
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"llama.cpp child failed ({p.returncode}):\n{p.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def _serve(req_path, out_path):
    import numpy as np
    from llama_cpp import Llama

    from edgellm.evaluate import score

    with open(req_path) as f:
        req = json.load(f)
    llm = Llama(model_path=req["model"], n_ctx=req["n_ctx"], n_batch=512, logits_all=True,
                n_threads=req["threads"], n_threads_batch=req["threads"], verbose=False)
    results = []
    for job in req["jobs"]:
        ids = [int(i) for i in job["ids"]]
        llm.reset()
        llm.eval(ids)
        if job["kind"] == "score":
            logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
            nll, top = score(logits, ids, job["first"])
            two = np.sort(logits[job["first"] - 1:len(ids) - 1], axis=1)[:, -2:]
            results.append({"nll": nll.tolist(), "top": top.tolist(),
                            "margin": (two[:, 1] - two[:, 0]).tolist()})
        else:
            out = []
            for _ in range(job["n"]):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if llm.token_eos() == tok or tok in job.get("stop", []):
                    break
                out.append(tok)
                llm.eval([tok])
            results.append({"tokens": out})
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
