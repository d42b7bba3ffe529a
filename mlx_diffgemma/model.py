"""DiffusionGemma text model: one set of Gemma 4 MoE weights run in two modes.

`encode` is a causal pass that appends K/V to the cache; `denoise` is a bidirectional
pass of a canvas over [cached K/V + canvas K/V] that never writes the cache.
Module and parameter names follow transformers' checkpoint keys so weights load 1:1.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import BaseModelArgs, create_causal_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.gemma4_text import geglu
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from .cache import SlidingWindowCache, cached_kv
from .dense_experts import dense_experts, use_dense
from .vision.tower import make_vision

_VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_TOP_LEVEL_KEYS = (
    "canvas_length",
    "model_type",
    "image_token_id",
    "boi_token_id",
    "eoi_token_id",
    "vision_config",
)


@dataclass
class ModelArgs(BaseModelArgs):
    # Defaults are the released google/diffusiongemma-26B-A4B-it text_config.
    model_type: str = "diffusion_gemma"
    vocab_size: int = 262144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    moe_intermediate_size: int = 704
    num_experts: int = 128
    top_k_experts: int = 8
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    # transformers falls back to 512 when neither this nor per_layer_config is given.
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = None
    per_layer_config: Optional[Dict[str, Dict[str, Any]]] = None
    layer_types: Optional[List[str]] = None
    sliding_window: int = 1024
    rope_parameters: Optional[Dict[str, Dict[str, Any]]] = None
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 262144
    canvas_length: int = 256
    pad_token_id: int = 0
    # Images: soft tokens stand at `image_token_id` placeholders; with "vision", the
    # encoder attends bidirectionally inside each run of them (transformers' mask).
    use_bidirectional_attention: Optional[str] = None
    image_token_id: int = 258880
    boi_token_id: int = 255999
    eoi_token_id: int = 258882
    vision_config: Optional[Dict[str, Any]] = None

    @classmethod
    def from_dict(cls, params):
        """Accept a top-level DiffusionGemma config (text_config + canvas_length) or a flat text config."""
        text = dict(params.get("text_config", params))
        for k in _TOP_LEVEL_KEYS:
            if k in params:
                text[k] = params[k]
        return super().from_dict(text)

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if (i + 1) % 6 else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        # transformers forces the last layer to full attention.
        self.layer_types = list(self.layer_types[: self.num_hidden_layers])
        self.layer_types[-1] = "full_attention"
        if self.rope_parameters is None:
            self.rope_parameters = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1000000.0,
                },
            }
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(
                f"hidden_activation={self.hidden_activation!r} is not supported; "
                "DiffusionGemma uses 'gelu_pytorch_tanh'."
            )
        if self.attention_bias:
            raise ValueError("attention_bias=True is not supported; DiffusionGemma has none.")
        if not self.tie_word_embeddings:
            raise ValueError(
                "tie_word_embeddings=False is not supported: the LM head is the embedding."
            )
        if self.use_bidirectional_attention not in (None, False, "vision"):
            raise ValueError(
                f"use_bidirectional_attention={self.use_bidirectional_attention!r} is not "
                "supported; DiffusionGemma uses 'vision' (or none)."
            )

    def attention_dims(self, i: int):
        """(head_dim, num_key_value_heads) of layer i, for either config key style."""
        if self.per_layer_config is not None:
            o = self.per_layer_config.get(str(i), self.per_layer_config.get(i, {}))
            return o.get("head_dim", self.head_dim), o.get(
                "num_key_value_heads", self.num_key_value_heads
            )
        if self.layer_types[i] == "full_attention":
            return self.global_head_dim, (
                self.num_global_key_value_heads or self.num_key_value_heads
            )
        return self.head_dim, self.num_key_value_heads


def rms_norm_no_scale(x, eps):
    return mx.fast.rms_norm(x, None, eps)


def embed_scaled(embed: nn.Module, ids: mx.array, scale: float) -> mx.array:
    # transformers casts sqrt(hidden) to the weight dtype first: 53.066 -> bf16 53.0.
    h = embed(ids)
    return h * mx.array(scale, dtype=h.dtype)


def embed_transpose_matmul(embed: nn.Module, x: mx.array) -> mx.array:
    """x @ E for E [vocab, hidden]: the self-conditioning soft embedding."""
    if isinstance(embed, nn.QuantizedEmbedding):
        return mx.quantized_matmul(
            x,
            embed.weight,
            embed.scales,
            embed.get("biases"),
            transpose=False,
            group_size=embed.group_size,
            bits=embed.bits,
            mode=embed.mode,
        )
    return x @ embed.weight


def attend_canvas(q, k, v, past):
    """Bidirectional attention of the canvas over [cached K/V + canvas K/V], no mask.

    RoPE is already in the keys, so order does not matter: one softmax over the two
    score blocks reads the cache in place instead of concatenating it every step.
    q: (B, H, C, D); k, v: (B, Hkv, C, D); past: None or cached (keys, values).
    """
    if past is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
    B, H, C, D = q.shape
    n_kv = k.shape[1]
    q = q.reshape(B, n_kv, H // n_kv * C, D)  # GQA: query heads grouped by KV head
    scores = [(q @ kk.swapaxes(-1, -2)).astype(mx.float32) for kk in (past[0], k)]
    m = mx.maximum(*[s.max(axis=-1, keepdims=True) for s in scores])
    e = [mx.exp(s - m) for s in scores]
    total = e[0].sum(axis=-1, keepdims=True) + e[1].sum(axis=-1, keepdims=True)
    o = e[0].astype(v.dtype) @ past[1] + e[1].astype(v.dtype) @ v
    return (o / total).astype(q.dtype).reshape(B, H, C, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        layer_type = args.layer_types[i]
        self.is_sliding = layer_type == "sliding_attention"
        self.window = args.sliding_window
        self.head_dim, self.n_kv_heads = args.attention_dims(i)
        self.n_heads = args.num_attention_heads
        self.eps = args.rms_norm_eps
        dim, hd = args.hidden_size, self.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        # Full-attention layers have no v_proj: v = v_norm(k_proj(x)), un-rotated.
        if self.is_sliding:
            self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=self.eps)
        self.k_norm = nn.RMSNorm(hd, eps=self.eps)
        rope = args.rope_parameters[layer_type]
        if rope.get("rope_type", "default") == "default" and (
            rope.get("partial_rotary_factor", 1.0) != 1.0
        ):
            raise ValueError(f"Partial rotation with default RoPE is not supported: {rope}")
        self.rope = initialize_rope(
            hd,
            base=rope["rope_theta"],
            traditional=False,
            scaling_config=rope,
            max_position_embeddings=args.max_position_embeddings,
        )

    def rotate(self, x, offset):
        """RoPE of x (B, L, heads, D), returned as (B, heads, L, D): from position
        `offset` on, or at per-position offsets when `offset` is a (B, L) array."""
        if isinstance(offset, mx.array) and offset.ndim == 2:
            B, L, h, D = x.shape
            x = self.rope(x.reshape(B * L, 1, h, D).swapaxes(1, 2), offset=offset.reshape(-1))
            return x.reshape(B, L, h, D).transpose(0, 2, 1, 3)
        return self.rope(x.transpose(0, 2, 1, 3), offset=offset)

    def kv(self, x, offset):
        B, L, _ = x.shape
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(k.shape) if self.is_sliding else k
        k = self.rotate(self.k_norm(k), offset)
        v = rms_norm_no_scale(v, self.eps).transpose(0, 2, 1, 3)
        return k, v

    def encode_mask(self, L: int, past: int, blocks: Optional[mx.array]):
        """The encoder's mask for L queries after `past` cached keys.

        Causal (windowed on sliding layers); with `blocks` (B, L), the image-run id of
        each token (-1 for text), a token also sees the rest of its run, as transformers'
        blockwise overlay ORs it in. A run never spans two encode calls.
        """
        window = self.window if self.is_sliding else None
        if blocks is None:
            if window is not None and past + L > window:
                return create_causal_mask(L, past, window_size=window)
            return "causal" if L > 1 else None
        mask = create_causal_mask(L, past, window_size=window)
        same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
        if past:
            same = mx.concatenate([mx.zeros((*same.shape[:2], past), mx.bool_), same], axis=-1)
        return (mask | same)[:, None]

    def __call__(self, x, cache, encode: bool, blocks: Optional[mx.array] = None):
        B, L, _ = x.shape
        offset = cache.offset
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        q = self.rotate(self.q_norm(q), offset)
        k, v = self.kv(x, offset)
        if encode:
            past = cache.size()
            k, v = cache.update_and_fetch(k, v)
            mask = self.encode_mask(L, past, blocks)
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        else:
            o = attend_canvas(q, k, v, cached_kv(cache))
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend_active(self, x, cache, positions, canvas_kv):
        """Attention of canvas positions `positions` (B, n) only, with the other canvas
        positions' K/V taken from `canvas_kv` (each (B, Hkv, C, D); None when x is the
        whole canvas in order). Returns (output, canvas K/V with these positions' fresh).
        """
        B, n, _ = x.shape
        offsets = cache.offset + positions
        q = self.q_proj(x).reshape(B, n, self.n_heads, self.head_dim)
        q = self.rotate(self.q_norm(q), offsets)
        k, v = self.kv(x, offsets)
        if canvas_kv is not None:
            idx = mx.broadcast_to(positions[:, None, :, None], k.shape)
            k = mx.put_along_axis(canvas_kv[0], idx, k, axis=2)
            v = mx.put_along_axis(canvas_kv[1], idx, v, axis=2)
        o = attend_canvas(q, k, v, cached_kv(cache))
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, n, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.top_k = args.top_k_experts
        self.root_size = args.hidden_size**-0.5
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, x):
        x = rms_norm_no_scale(x, self.eps) * self.scale * self.root_size
        scores = self.proj(x).astype(mx.float32)
        inds = mx.argpartition(scores, kth=-self.top_k, axis=-1)[..., -self.top_k :]
        inds = mx.stop_gradient(inds)
        # softmax over the top-k == full softmax, top-k, renormalise (transformers).
        weights = mx.softmax(mx.take_along_axis(scores, inds, axis=-1), axis=-1)
        return inds, weights * self.per_expert_scale[inds]


class Experts(nn.Module):
    """128 GeGLU experts with the checkpoint's fused gate|up weight (gate first)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, n = args.hidden_size, args.moe_intermediate_size, args.num_experts
        self.gate_up_proj = SwitchLinear(dim, 2 * hidden, n, bias=False)
        self.down_proj = SwitchLinear(hidden, dim, n, bias=False)
        # None: `use_dense` chooses per call (few, wide experts on the CPU); True/False forces.
        self.dense = None

    def __call__(self, x, inds, weights):
        # x: (N, D), inds/weights: (N, K)
        dense = use_dense(self, inds.shape[-1]) if self.dense is None else self.dense
        if dense:
            return dense_experts(self, x, inds, weights)
        x = mx.expand_dims(x, (-2, -3))
        # Sort the N*K (token, expert) rows by expert once; both matmuls reuse the order.
        do_sort = inds.size >= 64
        idx, inv_order = inds, None
        if do_sort:
            x, idx, inv_order = _gather_sort(x, inds)
        gate, up = mx.split(self.gate_up_proj(x, idx, sorted_indices=do_sort), 2, axis=-1)
        y = self.down_proj(geglu(gate, up), idx, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv_order, inds.shape)
        y = y.squeeze(-2)  # (N, K, D)
        # Weighted sum over the K experts in fp32, as transformers' grouped_mm path.
        return (y * weights[..., None]).sum(axis=-2).astype(y.dtype)


class DecoderLayer(nn.Module):
    """One transformer layer; the encoder runs the same weights with its own layer_scalar."""

    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, i)
        self.mlp = MLP(dim, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(dim, eps=eps)
        self.layer_scalar = mx.ones((1,))
        # The canvas always has the same shape, so the decoder's feed-forward compiles
        # once; `inputs=self` reads the current weights at every call.
        self._compiled_feed_forward = mx.compile(self.feed_forward, inputs=self)

    def feed_forward(self, r):
        # Dense MLP and MoE run in parallel on r; the router reads the un-normed r.
        h1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))
        flat = r.reshape(-1, r.shape[-1])
        inds, weights = self.router(flat)
        h2 = self.experts(self.pre_feedforward_layernorm_2(flat), inds, weights)
        h2 = self.post_feedforward_layernorm_2(h2.reshape(r.shape))
        return r + self.post_feedforward_layernorm(h1 + h2)

    def __call__(self, x, cache, encode: bool, layer_scalar: mx.array, blocks=None):
        h = self.self_attn(self.input_layernorm(x), cache, encode, blocks)
        r = x + self.post_attention_layernorm(h)
        ffn = self.feed_forward if encode else self._compiled_feed_forward
        return ffn(r) * layer_scalar

    def denoise_active(self, x, cache, positions, canvas_kv):
        """The decoder layer on canvas positions `positions` only (`Attention.attend_active`)."""
        h, canvas_kv = self.self_attn.attend_active(
            self.input_layernorm(x), cache, positions, canvas_kv
        )
        r = x + self.post_attention_layernorm(h)
        return self._compiled_feed_forward(r) * self.layer_scalar, canvas_kv


class SelfConditioning(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=self.eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x, soft: Optional[mx.array]):
        # With no signal (first step) the MLP of zeros is exactly zero: skip it.
        if soft is not None:
            n = self.pre_norm(soft)
            x = x + self.down_proj(geglu(self.gate_proj(n), self.up_proj(n)))
        return rms_norm_no_scale(x, self.eps)


class TextModel(nn.Module):
    """The stored text weights (`model.decoder.*`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class LayerScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class EncoderLanguageModel(nn.Module):
    """The encoder ties every weight to the decoder except its layer scalars."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [LayerScalar() for _ in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.language_model = EncoderLanguageModel(args)
        tower, embed = make_vision(args.vision_config, args.hidden_size)
        if tower is not None:  # absent in text-only folders
            self.vision_tower = tower
            self.embed_vision = embed


class DiffusionGemmaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = TextModel(args)
        self.encoder = Encoder(args)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DiffusionGemmaModel(args)
        self.embed_scale = args.hidden_size**0.5

    @property
    def layers(self):
        return self.model.decoder.layers

    def make_cache(self):
        """One cache per layer: full layers keep all tokens, sliding layers the last W-1."""
        return [
            KVCache() if t == "full_attention" else SlidingWindowCache(self.args.sliding_window - 1)
            for t in self.args.layer_types
        ]

    @property
    def has_vision(self) -> bool:
        """Whether the vision tower was loaded (text-only folders have none)."""
        return "vision_tower" in self.model.encoder

    def image_features(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        """The text-space soft tokens of one image (see `vision.VisionModel`).

        Args:
            pixel_values: (N, 3 * patch_size^2) patches in [0, 1].
            positions: (N, 2) int (x, y) patch coordinates.

        Returns:
            (N / pooling_kernel^2, hidden_size) embeddings for the image's placeholders.
        """
        if not self.has_vision:
            raise ValueError(
                "This model has no vision tower (a text-only folder); convert the original "
                "checkpoint again to keep it, or send text only."
            )
        encoder = self.model.encoder
        return encoder.embed_vision(encoder.vision_tower(pixel_values, positions))

    def _insert_images(self, input_ids, x, features):
        # The host reads the ids once per encode call: prompts only, never canvases.
        is_image = np.array(input_ids) == self.args.image_token_id
        if int(is_image.sum()) != features.shape[0]:
            raise ValueError(
                f"{features.shape[0]} image soft tokens were given for {int(is_image.sum())} "
                f"image placeholders (id {self.args.image_token_id}) in the input."
            )
        B, L, H = x.shape
        flat = x.reshape(B * L, H)
        flat[mx.array(np.flatnonzero(is_image))] = features.astype(x.dtype)
        if self.args.use_bidirectional_attention != "vision":
            return flat.reshape(B, L, H), None
        starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
        blocks = np.where(is_image, np.cumsum(starts, axis=1) - 1, -1)
        return flat.reshape(B, L, H), mx.array(blocks)

    def encode(
        self, input_ids: mx.array, cache: List[Any], image_features: Optional[mx.array] = None
    ) -> None:
        """Causal pass over `input_ids` (B, L) that appends their K/V to `cache`.

        Positions continue after the tokens already in the cache. Only K/V matter here,
        so the last layer computes just its K/V (no attention, FFN or final norm).

        With `image_features` (n, hidden), their rows replace the embeddings of the n
        `image_token_id` placeholders, in order, and (with `use_bidirectional_attention`
        "vision") the tokens of each run of placeholders attend to each other, as
        transformers' encoder does with `mm_token_type_ids`. A run must lie whole in
        one call; canvases are encoded without features, hence causally.
        """
        text = self.model.decoder
        scalars = self.model.encoder.language_model.layers
        x = embed_scaled(text.embed_tokens, input_ids, self.embed_scale)
        blocks = None
        if image_features is not None:
            x, blocks = self._insert_images(input_ids, x, image_features)
        for layer, s, c in zip(text.layers[:-1], scalars, cache):
            x = layer(x, c, True, s.layer_scalar, blocks)
        last, c = text.layers[-1], cache[-1]
        c.update_and_fetch(*last.self_attn.kv(last.input_layernorm(x), c.offset))

    def self_conditioning_embeddings(self, probs: mx.array) -> mx.array:
        """probs @ E * sqrt(hidden) in the embedding dtype: the expected input embedding."""
        embed = self.model.decoder.embed_tokens
        dtype = (
            embed.scales.dtype if isinstance(embed, nn.QuantizedEmbedding) else embed.weight.dtype
        )
        soft = embed_transpose_matmul(embed, probs.astype(dtype))
        return soft * mx.array(self.embed_scale, dtype=soft.dtype)

    def gathered_self_conditioning(self, ids: mx.array, weights: mx.array) -> mx.array:
        """sum_j weights[..., j] * E[ids[..., j]] * sqrt(hidden): `self_conditioning_embeddings`
        of probabilities that are zero outside `ids` (..., k), from k embedding rows.

        A quantized embedding's rows come back dequantized; the sum is in float32.
        """
        embed = self.model.decoder.embed_tokens
        rows = embed(ids)  # (..., k, H)
        soft = (weights.astype(mx.float32)[..., None, :] @ rows.astype(mx.float32))[..., 0, :]
        soft = soft.astype(rows.dtype)  # the dtype of self_conditioning_embeddings
        return soft * mx.array(self.embed_scale, dtype=soft.dtype)

    def denoise(
        self,
        canvas: mx.array,
        cache: List[Any],
        self_conditioning_logits: Optional[mx.array] = None,
        *,
        self_conditioning_probs: Optional[mx.array] = None,
        self_conditioning_embeddings: Optional[mx.array] = None,
        apply_softcap: bool = True,
    ) -> mx.array:
        """Bidirectional pass of `canvas` (B, C) over the cache; returns float32 logits (B, C, V).

        Canvas positions continue after the cache; the cache is not modified. The
        previous step's (temperature-scaled) logits condition the input; a sampler that
        already has their softmax passes `self_conditioning_probs` instead. With
        `apply_softcap=False` the logits come before the final tanh cap, for a sampler
        that fuses the cap into its own pass over the vocabulary. A sampler that builds
        the soft embedding itself (`gathered_self_conditioning`) passes
        `self_conditioning_embeddings` (B, C, H).
        """
        given = (self_conditioning_logits, self_conditioning_probs, self_conditioning_embeddings)
        if sum(g is not None for g in given) > 1:
            raise ValueError(
                "Pass one of self_conditioning_logits, _probs or _embeddings, not several."
            )
        text = self.model.decoder
        x = embed_scaled(text.embed_tokens, canvas, self.embed_scale)
        soft = self_conditioning_embeddings
        if self_conditioning_logits is not None:
            self_conditioning_probs = mx.softmax(
                self_conditioning_logits.astype(mx.float32), axis=-1, precise=True
            )
        if self_conditioning_probs is not None:
            soft = self.self_conditioning_embeddings(self_conditioning_probs)
        x = text.self_conditioning(x, soft)
        for layer, c in zip(text.layers, cache):
            x = layer(x, c, False, layer.layer_scalar)
        logits = text.embed_tokens.as_linear(text.norm(x)).astype(mx.float32)
        if not apply_softcap:
            return logits
        cap = self.args.final_logit_softcapping
        return mx.tanh(logits / cap) * cap

    def denoise_active(
        self,
        ids: mx.array,
        positions: mx.array,
        cache: List[Any],
        canvas_kv: Optional[List[Any]],
        self_conditioning_embeddings: Optional[mx.array] = None,
    ) -> Tuple[mx.array, List[Any]]:
        """`denoise` of canvas positions `positions` (B, n) only, holding `ids` (B, n):
        fast mode's active-set compaction. Returns their logits before the softcap
        (B, n, V) and the canvas K/V per layer, with these positions' K/V fresh.

        The other canvas positions are seen through `canvas_kv` (from an earlier call):
        their K/V is stale, an approximation (it changes the logits); with every
        position given and `canvas_kv` None this is `denoise` exactly (up to the
        order of floating-point sums). `self_conditioning_embeddings` (B, n, H) as in
        `denoise`.
        """
        text = self.model.decoder
        x = embed_scaled(text.embed_tokens, ids, self.embed_scale)
        x = text.self_conditioning(x, self_conditioning_embeddings)
        canvas_kv = canvas_kv or [None] * len(text.layers)
        fresh = []
        for layer, c, kv in zip(text.layers, cache, canvas_kv):
            x, kv = layer.denoise_active(x, c, positions, kv)
            fresh.append(kv)
        return text.embed_tokens.as_linear(text.norm(x)).astype(mx.float32), fresh

    __call__ = denoise

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map checkpoint keys to this model's parameters; idempotent.

        Accepts the transformers layout (tied copies dropped, the vision tower kept when
        the model has one, fused expert tensors without a `.weight` suffix) and converted
        MLX folders.
        """
        out = {}
        for k, v in weights.items():
            if k.startswith(_VISION_PREFIXES) and not self.has_vision:
                continue  # a text-only model
            if k == "lm_head.weight" or "rotary_emb" in k:
                continue  # tied to embed_tokens / recomputed
            if k.startswith("model.encoder.language_model.") and not k.endswith(".layer_scalar"):
                continue  # tied copies of model.decoder.*
            if k.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                k = f"{k}.weight"
            out[k] = v
        return out

    @property
    def quant_predicate(self):
        """Mixed recipe: experts and self-conditioning at the requested bits; embedding,
        attention, dense MLP and router at 8 bits (they set how fast denoising converges);
        the vision tower and its projector unquantized."""

        def predicate(path, module):
            if ".vision_tower." in path or ".embed_vision." in path:
                return False  # left in float, as mlx-vlm builds leave it
            eight_bit = path.endswith(("embed_tokens", "router.proj"))
            if eight_bit or ".self_attn." in path or ".mlp." in path:
                # Like mlx-lm, leave a layer in float when groups do not divide its rows.
                return module.weight.shape[-1] % 64 == 0 and {"group_size": 64, "bits": 8}
            return True

        return predicate
