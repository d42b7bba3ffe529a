"""DiffusionGemma on MLX."""

__version__ = "0.1.0"

import warnings

from .config import DiffusionConfig
from .generate import CanvasLayout, GenerationResponse, PromptCache, generate, stream_generate
from .infill import InfillResult, InfillTemplate, infill, stream_infill
from .loader import load, load_model
from .structured import (
    StructuredResult,
    generate_json,
    generate_table,
    json_template,
    spec_from_json_schema,
    table_template,
    validate_json,
    validate_table,
)

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
    "StructuredResult",
    "generate",
    "generate_json",
    "generate_table",
    "infill",
    "json_template",
    "load",
    "load_model",
    "spec_from_json_schema",
    "stream_generate",
    "stream_infill",
    "table_template",
    "validate_json",
    "validate_table",
]
