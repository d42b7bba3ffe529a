"""DiffusionGemma on MLX."""

__version__ = "0.1.0"

import importlib
import sys
import types

# Public name -> the module that defines it. The names are imported on first use
# (PEP 562), so importing the package (as `python -m mlx_diffgemma.generate` and the
# `mlx_diffgemma` command do first) does not import MLX or any submodule.
_EXPORTS = {
    "DiffusionConfig": "diffusion.config",
    "CanvasLayout": "generate",
    "FastSettings": "diffusion.config",
    "GenerationResponse": "generate",
    "PromptCache": "generate",
    "generate": "generate",
    "stream_generate": "generate",
    "InfillResult": "tasks.infill",
    "InfillTemplate": "tasks.infill",
    "infill": "tasks.infill",
    "stream_infill": "tasks.infill",
    "load": "loader",
    "load_model": "loader",
    "StructuredResult": "tasks.structured",
    "generate_json": "tasks.json_schema",
    "generate_skeleton": "tasks.structured",
    "json_frame": "tasks.json_schema",
    "SchemaError": "tasks.json_schema",
    "generate_table": "tasks.structured",
    "json_template": "tasks.structured",
    "spec_from_json_schema": "tasks.structured",
    "table_template": "tasks.structured",
    "validate_json": "tasks.structured",
    "validate_table": "tasks.structured",
}

__all__ = sorted(_EXPORTS, key=str.lower)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the submodule `generate` (or `infill`) binds it as an attribute of the
        # package; the public function of the same name must stay what the name means.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
