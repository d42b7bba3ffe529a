"""The MLX model on its own: config styles, sanitize, cache semantics, dtypes."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache

from mlx_diffgemma.cache import SlidingWindowCache
from mlx_diffgemma.model import Model, ModelArgs

TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "full_attention"],
    num_experts=4,
    top_k_experts=2,
)


def tiny(style="release", **kw):
    text = {**TEXT, **kw}
    if style == "release":
        text.update(global_head_dim=32, num_global_key_value_heads=1)
    else:
        text["per_layer_config"] = {
            str(i): {"head_dim": 32, "num_key_value_heads": 1}
            for i, t in enumerate(text["layer_types"])
            if t == "full_attention"
        }
    return ModelArgs.from_dict(
        {"model_type": "diffusion_gemma", "text_config": text, "canvas_length": 8}
    )


def random_model(args, seed=0, std=0.5):
    """Random weights; norms and scalars around 1 so that w-vs-(1+w) mistakes show."""
    mx.random.seed(seed)
    model = Model(args)
    model.load_weights(
        [
            (k, mx.random.normal(v.shape) * std + (1.0 if "norm" in k or "scal" in k else 0.0))
            for k, v in tree_flatten(model.parameters())
        ]
    )
    return model


def test_both_config_key_styles_give_the_same_shapes():
    a, b = tiny("release"), tiny("per_layer")
    assert [a.attention_dims(i) for i in range(3)] == [(16, 2), (32, 1), (32, 1)]
    assert [b.attention_dims(i) for i in range(3)] == [(16, 2), (32, 1), (32, 1)]

    def shapes(m):
        return {k: v.shape for k, v in tree_flatten(Model(m).parameters())}

    assert shapes(a) == shapes(b)
    # Full layers have no v_proj (k == v).
    assert "model.decoder.layers.1.self_attn.v_proj.weight" not in shapes(a)
    assert a.canvas_length == 8


def test_defaults_and_release_layer_pattern():
    args = ModelArgs.from_dict({"model_type": "diffusion_gemma", "text_config": {}})
    full = [i for i, t in enumerate(args.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17, 23, 29]
    assert args.attention_dims(5) == (512, 8)  # transformers: global_head_dim falls back to 512
    assert args.attention_dims(0) == (256, 8)


def test_unsupported_config_values_raise():
    with pytest.raises(ValueError, match="hidden_activation"):
        tiny(hidden_activation="silu")
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        tiny(tie_word_embeddings=False)


def hf_layout_weights(model):
    """The model's weights under transformers' checkpoint names, plus keys it drops."""
    w = dict(tree_flatten(model.parameters()))
    w = {k[: -len(".weight")] if ".experts." in k else k: v for k, v in w.items()}
    w["model.encoder.vision_tower.encoder.layers.0.mlp.down_proj.linear.weight"] = mx.zeros((4, 4))
    w["model.encoder.embed_vision.embedding_projection.weight"] = mx.zeros((4, 4))
    w["lm_head.weight"] = w["model.decoder.embed_tokens.weight"]
    return w


def test_sanitize_maps_hf_names_and_is_idempotent():
    model = Model(tiny())
    hf = hf_layout_weights(model)
    assert "model.decoder.layers.0.experts.gate_up_proj" in hf
    once = model.sanitize(hf)
    assert set(once) == set(dict(tree_flatten(model.parameters())))
    twice = model.sanitize(once)
    assert set(twice) == set(once)
    assert all(twice[k] is once[k] for k in once)
    model.load_weights(list(once.items()), strict=True)


def test_two_layer_scalar_sets_are_used():
    model = random_model(tiny())
    ids, canvas = mx.array([[1, 2, 3, 4, 5]]), mx.array([[7] * 8])
    c = model.make_cache()
    model.encode(ids, c)
    base = model.denoise(canvas, c)
    # The decoder scalar of layer 0 changes the decoder output but not the cache.
    model.model.decoder.layers[0].layer_scalar = mx.array([3.0])
    c2 = model.make_cache()
    model.encode(ids, c2)
    assert np.allclose(np.array(c2[1].state[0]), np.array(c[1].state[0]))
    assert not np.allclose(np.array(model.denoise(canvas, c2)), np.array(base))
    # The encoder scalar changes the cache of later layers.
    model.model.encoder.language_model.layers[0].layer_scalar = mx.array([3.0])
    c3 = model.make_cache()
    model.encode(ids, c3)
    assert not np.allclose(np.array(c3[1].state[0]), np.array(c[1].state[0]))


def test_cache_keeps_window_minus_one_and_denoise_does_not_write():
    model = random_model(tiny())
    cache = model.make_cache()
    assert isinstance(cache[0], SlidingWindowCache) and isinstance(cache[1], KVCache)
    model.encode(mx.arange(20)[None], cache)
    assert cache[0].size() == 7 and cache[0].offset == 20  # W - 1
    assert cache[1].offset == 20 and cache[2].offset == 20
    before = [np.array(c.state[0]) for c in cache]
    model.denoise(mx.zeros((1, 8), dtype=mx.int32), cache)
    assert [c.offset for c in cache] == [20, 20, 20]
    for b, c in zip(before, cache):
        assert np.array_equal(b, np.array(c.state[0]))


@pytest.mark.parametrize("chunk", [1, 3, 8, 9])
def test_chunked_encode_equals_one_pass(chunk):
    model = random_model(tiny())
    ids = mx.array(np.random.default_rng(0).integers(0, 128, (2, 21)))
    canvas = mx.array(np.random.default_rng(1).integers(0, 128, (2, 8)))
    full = model.make_cache()
    model.encode(ids, full)
    parts = model.make_cache()
    for i in range(0, 21, chunk):
        model.encode(ids[:, i : i + chunk], parts)
    a, b = model.denoise(canvas, full), model.denoise(canvas, parts)
    assert a.shape == (2, 8, 128) and a.dtype == mx.float32
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_batch_rows_are_independent():
    model = random_model(tiny())
    ids = mx.array([[1, 2, 3, 4], [9, 8, 7, 6]])
    canvas = mx.array([[5] * 8, [11] * 8])
    c = model.make_cache()
    model.encode(ids, c)
    both = model.denoise(canvas, c)
    c1 = model.make_cache()
    model.encode(ids[1:], c1)
    np.testing.assert_allclose(
        np.array(both[1:]), np.array(model.denoise(canvas[1:], c1)), atol=1e-5
    )


def quantize(model, bits=8, group_size=32):
    predicate = model.quant_predicate
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and predicate(p, m),
    )


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_low_precision_smoke(dtype):
    # The CPU's gather_mm is float32-only; the quantized path runs in any float dtype.
    model = random_model(tiny())
    quantize(model)
    model.set_dtype(dtype)
    c = model.make_cache()
    model.encode(mx.array([[1, 2, 3]]), c)
    first = model.denoise(mx.array([[4] * 8]), c)
    logits = model.denoise(mx.array([[4] * 8]), c, self_conditioning_logits=first)
    assert logits.dtype == mx.float32 and bool(mx.all(mx.abs(logits) <= 30.0))
    assert c[0].state[0].dtype == dtype


def test_quantized_model_runs_with_quantized_embedding():
    # Small weights: larger ones make this random model chaotic under any perturbation.
    model = random_model(tiny(), std=0.1)
    ref_c = model.make_cache()
    model.encode(mx.array([[1, 2, 3]]), ref_c)
    ref = model.denoise(mx.array([[4] * 8]), ref_c)
    quantize(model, bits=8)
    assert isinstance(model.model.decoder.embed_tokens, nn.QuantizedEmbedding)
    assert model.model.decoder.layers[0].experts.gate_up_proj.bits == 8
    c = model.make_cache()
    model.encode(mx.array([[1, 2, 3]]), c)
    logits = model.denoise(mx.array([[4] * 8]), c)
    # 8 bits stays close to the float model (fp32 activations on CPU); a flipped expert
    # choice can still move single logits a lot, so compare the mean error.
    err = np.abs(np.array(logits) - np.array(ref)).mean() / np.abs(np.array(ref)).mean()
    assert err < 0.1
    out = model.denoise(mx.array([[4] * 8]), c, self_conditioning_logits=logits)
    assert out.shape == (1, 8, 128) and not bool(mx.any(mx.isnan(out)))
