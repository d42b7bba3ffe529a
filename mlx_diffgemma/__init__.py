"""DiffusionGemma on MLX."""

__version__ = "0.1.0"

import warnings

from .config import DiffusionConfig
from .generate import CanvasLayout, GenerationResponse, PromptCache, generate, stream_generate
from .infill import InfillResult, InfillTemplate, infill, stream_infill
from .loader import load, load_model

# `python -m mlx_diffgemma.generate` runs the module that this package has imported
# already; its `main()` only starts the CLI, so runpy's warning about that is noise.
warnings.filterwarnings(
    "ignore", message="'mlx_diffgemma.generate' found in sys.modules", category=RuntimeWarning
)

__all__ = [
    "CanvasLayout",
    "DiffusionConfig",
    "GenerationResponse",
    "InfillResult",
    "InfillTemplate",
    "PromptCache",
    "generate",
    "infill",
    "load",
    "load_model",
    "stream_generate",
    "stream_infill",
]
