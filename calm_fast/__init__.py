"""calm_fast: fast Continuous Audio Language Models (CALM) and Pocket TTS-compatible generation."""
__version__ = "0.1.0"

from .errors import CacheFullError, CalmFastError, UnknownStreamError  # noqa: F401
