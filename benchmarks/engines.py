"""The engines the benchmarks time (edgellm, llama.cpp, onnxruntime), behind one small interface:
prefill(ids) and step(tok) return the last position's logits; all_logits(ids) every position's.

No side effects at import: a benchmark sets its thread environment first, then imports this.
"""

import numpy as np


class _Stepper:
    """An engine whose rt has reset() and forward(ids), which returns logits per position."""

    def prefill(self, ids):
        self.rt.reset()
        return self.rt.forward(ids)[-1]

    def step(self, tok):
        return self.rt.forward([tok])[-1]


class Edge(_Stepper):
    name = "edgellm"

    def __init__(self, path, n_ctx, threads):
        import edgellm

        try:
            self.model = edgellm.load(path, n_ctx=n_ctx, threads=threads)  # Numba and BLAS
        except TypeError:  # an older runtime without the option: numba.set_num_threads only
            self.model = edgellm.load(path, n_ctx=n_ctx)
        self.rt = self.model.runtime

    def all_logits(self, ids):
        self.rt.reset()
        return self.rt.forward(ids, all_logits=True)


class Llama:
    name = "llama.cpp"

    def __init__(self, path, n_ctx, threads, logits_all=False):
        from llama_cpp import Llama as L

        self.llm = L(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                     n_batch=n_ctx, use_mmap=True, logits_all=logits_all, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _last(self):
        # the last output row (with logits_all every position has one)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return self._last()

    def step(self, tok):
        self.llm.eval([int(tok)])
        return self._last()

    def all_logits(self, ids):
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return np.array(self.llm.scores[:len(ids)])

    def close(self):
        self.llm.close()


class Onnx(_Stepper):
    """onnxruntime on a directory written by `edgellm export MODEL --to onnx` (the same weights;
    edgellm/export_onnx.py). exact=False leaves onnxruntime's default int8-activation matmuls on
    for int8 weights (faster, not the same numbers)."""

    name = "onnxruntime"

    def __init__(self, path, n_ctx, threads, exact=True):
        from edgellm.export_onnx import OnnxRunner

        self.rt = OnnxRunner(path, threads=threads, exact=exact)

    def all_logits(self, ids):
        self.rt.reset()
        return self.rt.forward(ids)
