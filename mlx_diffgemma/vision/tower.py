"""The Gemma 4 vision tower and its projector into the text embedding space.

Mirrors transformers' `Gemma4VisionModel` and `DiffusionGemmaMultimodalEmbedder`: patch
embedding with a learned 2-D position table, bidirectional encoder layers with 2-D RoPE,
k x k average pooling by patch position, sqrt(hidden) scaling and standardisation, then an
unscaled RMS norm and a linear projection. Module and parameter names follow the
checkpoint keys (`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`).
"""

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gemma4_text import geglu

# Attention queries per block (see VisionAttention).
QUERY_BLOCK = 2048


@dataclass
class VisionConfig:
    # Defaults are transformers' `Gemma4VisionConfig`; the release config sets its own.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_parameters: Dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "axial", "rope_theta": 100.0}
    )
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "VisionConfig":
        """The known keys of a `vision_config` dict; the rest is ignored, as transformers does."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names and v is not None})

    def __post_init__(self):
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(
                f"vision_config.hidden_activation={self.hidden_activation!r} is not supported; "
                "Gemma 4 uses 'gelu_pytorch_tanh'."
            )
        if self.attention_bias:
            raise ValueError(
                "vision_config.attention_bias=True is not supported; Gemma 4 has none."
            )
        # transformers maps the release's "default" to "axial" (the same 2-D rope).
        rope_type = self.rope_parameters.get("rope_type", "axial")
        if rope_type not in ("default", "axial"):
            raise ValueError(
                f"vision_config rope_type {rope_type!r} is not supported; Gemma 4 uses 'axial'."
            )
        if self.head_dim % 4:
            raise ValueError(
                f"vision_config.head_dim={self.head_dim} must be a multiple of 4 (2-D RoPE)."
            )


class ClippableLinear(nn.Module):
    """A bias-free linear layer, optionally clamping its input and output (checkpoint buffers)."""

    def __init__(self, in_dims: int, out_dims: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x):
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


def rope_2d(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate x (N, H, D): the first D/2 channels by the x position, the rest by y.

    Each half rotates "rotate_half" style (pairs i, i + D/4), as transformers'
    `apply_multidimensional_rope`; cos/sin are (N, 1, D) in x's dtype.
    """
    d = x.shape[-1] // 2
    parts = []
    for a, half in enumerate(mx.split(x, 2, axis=-1)):
        x1, x2 = mx.split(half, 2, axis=-1)
        rotated = mx.concatenate([-x2, x1], axis=-1)
        parts.append(half * cos[..., a * d : (a + 1) * d] + rotated * sin[..., a * d : (a + 1) * d])
    return mx.concatenate(parts, axis=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        self.eps = config.rms_norm_eps
        clip = config.use_clipped_linears
        self.q_proj = ClippableLinear(dim, self.n_heads * hd, clip)
        self.k_proj = ClippableLinear(dim, self.n_kv_heads * hd, clip)
        self.v_proj = ClippableLinear(dim, self.n_kv_heads * hd, clip)
        self.o_proj = ClippableLinear(self.n_heads * hd, dim, clip)
        self.q_norm = nn.RMSNorm(hd, eps=self.eps)
        self.k_norm = nn.RMSNorm(hd, eps=self.eps)

    def __call__(self, x, cos, sin):
        N = x.shape[0]
        q = rope_2d(self.q_norm(self.q_proj(x).reshape(N, self.n_heads, -1)), cos, sin)
        k = rope_2d(self.k_norm(self.k_proj(x).reshape(N, self.n_kv_heads, -1)), cos, sin)
        v = mx.fast.rms_norm(self.v_proj(x).reshape(N, self.n_kv_heads, -1), None, self.eps)
        # (1, heads, N, D): every patch of one image sees every other (no mask, no padding).
        q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))
        # Queries in blocks: a CPU materialises the scores, and at 1120 soft tokens (10,080
        # patches) they would take 6.5 GB per layer at once; rows are independent.
        o = mx.concatenate(
            [
                mx.fast.scaled_dot_product_attention(q[:, :, i : i + QUERY_BLOCK], k, v, scale=1.0)
                for i in range(0, N, QUERY_BLOCK)
            ],
            axis=2,
        )
        return self.o_proj(o[0].transpose(1, 0, 2).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim, hidden, clip = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(dim, hidden, clip)
        self.up_proj = ClippableLinear(dim, hidden, clip)
        self.down_proj = ClippableLinear(hidden, dim, clip)

    def __call__(self, x):
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x, cos, sin):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = mx.ones(
            (2, config.position_embedding_size, config.hidden_size)
        )

    def __call__(self, pixel_values, positions):
        # Pixels arrive in [0, 1]; Gemma 4 maps them to [-1, 1] here, not in the processor.
        table = self.position_embedding_table  # never quantized: its dtype is the tower's
        h = self.input_proj((2 * (pixel_values - 0.5)).astype(table.dtype))
        return h + table[0][positions[:, 0]] + table[1][positions[:, 1]]


def pool_by_position(h: mx.array, positions: mx.array, k: int) -> mx.array:
    """Average the patches of each k x k cell (float32), row-major over the pooled grid.

    As transformers' `Gemma4VisionPooler._avg_pool_by_positions`: cell index
    x // k + (width // k) * (y // k), weights 1 / k^2.
    """
    n = h.shape[0] // (k * k)
    width = positions[:, 0].max() + 1
    cell = positions[:, 0] // k + (width // k) * (positions[:, 1] // k)
    weights = (cell[None, :] == mx.arange(n)[:, None]).astype(mx.float32) / (k * k)
    return weights @ h.astype(mx.float32)


class VisionModel(nn.Module):
    """`model.encoder.vision_tower`: patches of one image -> its soft tokens (n, hidden)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))

    def rope(self, positions: mx.array, dtype: mx.Dtype):
        """cos, sin (N, 1, head_dim): x-position angles then y-position angles, each doubled."""
        c = self.config
        half = c.head_dim // 2
        theta = c.rope_parameters.get("rope_theta", 100.0)
        inv_freq = 1.0 / (theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half))
        angles = []
        for a in range(2):
            f = positions[:, a : a + 1].astype(mx.float32) * inv_freq
            angles += [f, f]
        angles = mx.concatenate(angles, axis=-1)[:, None, :]
        return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)

    def __call__(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        """Soft tokens of one image.

        Args:
            pixel_values: (N, 3 * patch_size^2) patches, values in [0, 1] (the processor's).
            positions: (N, 2) int (x, y) patch coordinates, N a multiple of pooling_kernel^2.

        Returns:
            (N / pooling_kernel^2, hidden_size) in the tower's dtype.
        """
        h = self.patch_embedder(pixel_values, positions)
        cos, sin = self.rope(positions, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        k = self.config.pooling_kernel_size
        # Pooled, scaled and standardised in float32: the scaling can exceed fp16's range.
        pooled = pool_by_position(h, positions, k) * self.config.hidden_size**0.5
        if self.config.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(h.dtype)


class MultimodalEmbedder(nn.Module):
    """`model.encoder.embed_vision`: soft tokens -> text embeddings (unscaled RMS norm, linear)."""

    def __init__(self, vision_hidden: int, text_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(vision_hidden, text_hidden, bias=False)

    def __call__(self, x):
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))


def make_vision(vision_config: Optional[Dict[str, Any]], text_hidden: int):
    """(VisionModel, MultimodalEmbedder) for a `vision_config` dict, or (None, None)."""
    if not vision_config:
        return None, None
    config = VisionConfig.from_dict(vision_config)
    embed = MultimodalEmbedder(config.hidden_size, text_hidden, config.rms_norm_eps)
    return VisionModel(config), embed
