"""edgellm: run language models on small CPUs.

Keep this module light: a device that only generates must not import the converters.
"""

__version__ = "0.1.0"


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
