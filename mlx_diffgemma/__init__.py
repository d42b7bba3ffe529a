"""DiffusionGemma on MLX."""

from .config import DiffusionConfig
from .generate import GenerationResponse, generate, stream_generate
from .loader import load, load_model

__all__ = [
    "DiffusionConfig",
    "GenerationResponse",
    "generate",
    "load",
    "load_model",
    "stream_generate",
]
