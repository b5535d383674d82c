"""The one family of errors edgellm raises for problems a user can fix."""


class EdgeLLMError(Exception):
    """Base class: a clear, user-facing error (bad file, bad parameter, bad model)."""


class FormatError(EdgeLLMError):
    """A model directory or file that does not follow docs/FORMAT.md. Names the file."""

    def __init__(self, path, message):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class ConvertError(EdgeLLMError):
    """A source checkpoint the converter cannot represent (unsupported architecture, missing file)."""


class ContextLengthError(EdgeLLMError):
    """The prompt plus requested tokens does not fit in the model's context window."""
