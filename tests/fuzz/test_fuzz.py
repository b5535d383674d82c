"""The readers' fuzzing in CI: the regression corpus (inputs that once crashed a reader) replayed
in a child process with a capped address space (replay.py), every target's seeds reaching a loaded
object, and a short bounded atheris run of each target.

Long runs: scripts/fuzz (tests/fuzz/fuzz.py documents the harness).
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import targets  # noqa: E402

CORPUS = os.path.join(HERE, "corpus")
SECONDS = float(os.environ.get("EDGELLM_FUZZ_SECONDS", "8"))  # per target in CI


def regression_inputs():
    out = []
    for t in targets.TARGETS:
        d = os.path.join(CORPUS, t)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            out.append(pytest.param(t, os.path.join(d, name), id=f"{t}/{name}"))
    return out


# the replay's address-space cap: a normal input peaks near 0.7 GB of address space; the
# n_layers input once took 21 GB, and the kernel's OOM killer then took the whole pytest run
REPLAY_LIMIT_MB = 4096
# a hang's bound: a cold Numba cache compiles the kernels first (minutes on a busy machine)
REPLAY_SECONDS = 1800


def replay(inputs):
    """{(target, path): result} for every input, replayed by replay.py in child processes under
    REPLAY_LIMIT_MB of address space; a child that dies (a native crash) marks the input it was
    running and a new child goes on with the rest."""
    # few threads: each reserves address space (stacks, malloc arenas, BLAS buffers)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               RAYON_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    results, todo = {}, list(inputs)
    while todo:
        args = [a for pair in todo for a in pair]
        try:
            p = subprocess.run([sys.executable, os.path.join(HERE, "replay.py"), "--limit-mb",
                                str(REPLAY_LIMIT_MB), *args], capture_output=True, text=True,
                               errors="replace", env=env, cwd=os.path.dirname(HERE),
                               timeout=REPLAY_SECONDS)
        except subprocess.TimeoutExpired as e:  # a hang: killed, its input marked
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                        for x in (e.stdout, e.stderr))
            p = subprocess.CompletedProcess(e.cmd, f"killed after {REPLAY_SECONDS} s (a hang)",
                                            out, err)
        running = None
        for line in p.stdout.splitlines():
            kind, _, js = line.partition(" ")
            if kind == "REPLAY-START":
                running = tuple(json.loads(js).values())
            elif kind == "REPLAY":
                r = json.loads(js)
                results[r["target"], r["path"]] = r
                running = None
        if running is None and len(results) < len(inputs):  # died before its first input
            running = todo[0]
        if running is not None:
            results[running] = {"result": "died", "returncode": p.returncode,
                                "stderr": p.stderr[-4000:]}
        todo = [i for i in todo if i not in results]
    return results


@pytest.fixture(scope="module")
def replayed():
    return replay([tuple(p.values[:2]) for p in regression_inputs()])


@pytest.mark.parametrize("target,path", regression_inputs())
def test_regression_input_ends_in_a_model_or_a_clear_error(target, path, replayed):
    r = replayed[target, path]
    name = os.path.relpath(path, CORPUS)
    if r["result"] == "died":
        pytest.fail(f"{name}: the replay process died on this input (status {r['returncode']}, "
                    f"a native crash, or the kernel's OOM killer):\n{r['stderr']}")
    if r["result"] == "finding" and r["memory"]:
        pytest.fail(f"{name}: ran out of the {REPLAY_LIMIT_MB} MB address-space cap (a runaway "
                    f"allocation):\n{r['traceback']}")
    assert r["result"] != "finding", f"{name}: not an EdgeLLMError:\n{r['traceback']}"


@pytest.mark.parametrize("target", targets.TARGETS)
def test_seeds_reach_a_loaded_object(target):
    """The harness itself works: a valid seed goes all the way (load, generate)."""
    assert any(targets.run(target, s) for s in targets.seeds(target))


def test_reads_outside_the_model_directory_are_caught():
    """The audit hook the targets rely on sees a reader opening a file next to the model."""
    ws = targets.workspace()
    ws.fresh()
    with pytest.raises(targets.ReadOutside, match="canary"):
        with targets.watch(ws.model):
            open(os.path.join(ws.root, "canary")).close()


@pytest.mark.slow
@pytest.mark.parametrize("target", targets.TARGETS)
def test_short_fuzz_run(target, tmp_path):
    pytest.importorskip("atheris", reason="atheris (the `test` extra) runs the fuzzers")
    env = dict(os.environ, EDGELLM_FUZZ_DIR=str(tmp_path))
    p = subprocess.run([sys.executable, os.path.join(HERE, "fuzz.py"), target, "--seconds",
                        str(SECONDS)], capture_output=True, text=True, errors="replace",
                       env=env, timeout=SECONDS + 600)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("FUZZ-SUMMARY ")]
    assert lines, f"the fuzzer stopped by itself (a crash, hang or OOM):\n{p.stderr[-3000:]}"
    s = json.loads(lines[-1].split(" ", 1)[1])
    print(f"\n{target}: {s}")
    assert not s["findings"], p.stderr[-5000:]
    assert p.returncode == 0 and s["execs"] > 0


@pytest.mark.parametrize("base", ["base", "hf_base"])
def test_text_with_a_lone_surrogate_is_a_clear_error(base):
    """JSON text may hold "\\udcff" (a server request, a session's messages): the tokenizer
    libraries raise RuntimeError on it; edgellm says what is wrong."""
    from edgellm.runtime.errors import EdgeLLMError

    import edgellm

    m = edgellm.load(getattr(targets.workspace(), base), n_ctx=32)
    with pytest.raises(EdgeLLMError, match="lone surrogate"):
        m.tokenizer.encode("Hello \udcff world")
    with pytest.raises(EdgeLLMError, match="lone surrogate"):
        m.complete("Hello \udcff world", max_tokens=2)
