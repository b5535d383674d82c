"""edgellm: run language models on small CPUs.

Keep this module light: a device that only generates must not import the converters.
"""

import os
import sys

__version__ = "0.1.0"

# OpenBLAS's idle workers spin for about 0.1 s after every call (THREAD_TIMEOUT 2^28 cycles); a
# prefill alternates BLAS calls with Numba kernels, whose threads then found both cores taken:
# 2-thread prefill fell to 14-16 tokens/s against 80 on one thread (runtime/threads.py). 4 (2^4
# cycles) lets them sleep at once. OpenBLAS reads it when it loads (numpy's import), so here,
# before anything of edgellm imports numpy; a user's own setting wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
BLAS_TIMEOUT_EARLY = "numpy" not in sys.modules  # OpenBLAS not loaded yet: it reads the above


def load(path, verify=False, **kwargs):
    """Load a converted model directory: load(path, verify=False, n_ctx=None, threads=None).
    See edgellm.model.Model.load."""
    from .model import Model

    return Model.load(path, verify=verify, **kwargs)


def __getattr__(name):
    if name == "Model":
        from .model import Model

        return Model
    if name in ("EdgeLLMError", "FormatError", "ConvertError", "ContextLengthError"):
        from .runtime import errors

        return getattr(errors, name)
    raise AttributeError(name)
