"""Exception types shared by the C++ extension and the pure-Python code paths."""


class CalmFastError(Exception):
    """Base class of calm_fast's own errors."""


class CacheFullError(CalmFastError, RuntimeError):
    """The KV cache has fewer free blocks than an operation needs. Nothing was changed."""


class UnknownStreamError(CalmFastError, KeyError):
    """A stream id that the cache manager does not know (never created, or freed)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AudioError(CalmFastError, ValueError):
    """Audio that cannot be used: empty, silent, corrupt, too long, not audio, bad layout."""


class MissingFileError(CalmFastError, FileNotFoundError):
    """A file an argument names does not exist (the message names the argument and path)."""


class CheckpointError(CalmFastError, ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching the model."""


class ArgumentError(CalmFastError, ValueError):
    """A value outside what an argument allows (the message names the argument, the value
    and the allowed range)."""


class ArgumentTypeError(CalmFastError, TypeError):
    """A value of the wrong type for an argument (the message names both)."""


class NonFiniteError(CalmFastError, ArithmeticError):
    """A request's computation produced NaN or Inf; the request was ended."""
