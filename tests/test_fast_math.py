"""Fast mode's math on arrays: exact top-k, top-k statistics, gathered self-conditioning,
the commit rules and the EOS tail cut, compaction's forward and buckets."""

import mlx.core as mx
import pytest
from conftest import random_tiny_model

from mlx_diffgemma.diffusion import sampler as S
from mlx_diffgemma.diffusion import topk as T
from mlx_diffgemma.diffusion.config import DiffusionConfig
from mlx_diffgemma.diffusion.fast import bucket
from mlx_diffgemma.diffusion.steps import prefill


@pytest.mark.parametrize("V", [4096, 4096 + 37])
def test_top_k_ids_are_the_exact_top_k(V):
    x = mx.random.normal((2, 3, V), key=mx.random.key(V))
    ids = T.top_k_ids(x, 16)
    ref = mx.sort(mx.argsort(-x, axis=-1)[..., :16], axis=-1)
    assert mx.array_equal(ids, ref)


def test_top_k_stats_equal_the_full_vocabulary_when_the_rest_has_no_mass():
    V, k = 8192, 32
    key1, key2, key3 = mx.random.split(mx.random.key(1), 3)
    logits = mx.full((2, 5, V), -1e4)  # exp underflows to exactly 0 at any temperature here
    support = mx.random.randint(0, V, (2, 5, k), key=key1)
    logits = mx.put_along_axis(logits, support, 3 * mx.random.normal(support.shape, key=key2), -1)
    temp, cap = mx.array(0.7), 30.0
    p, ent, argmax = S.step_stats(logits, temp, cap)
    pk, entk, argmaxk, ids = T.top_k_stats(logits, temp, cap, k=k)
    assert mx.array_equal(argmax, argmaxk)
    assert mx.allclose(ent, entk, atol=1e-5)
    u = mx.random.uniform(shape=(2, 5), key=key3)
    full = S.sample_categorical(p, u)
    top = mx.take_along_axis(ids, S.sample_categorical(pk, u)[..., None], -1)[..., 0]
    assert mx.array_equal(full, top)
    # With mass outside the top k, top-k renormalises: its entropy is smaller.
    noisy = mx.random.normal(logits.shape, key=key1)
    assert (T.top_k_stats(noisy, temp, cap, k=k)[1] < S.step_stats(noisy, temp, cap)[1]).all()


def test_gathered_self_conditioning_equals_the_full_product():
    model = random_tiny_model()
    V = model.args.vocab_size
    ids = mx.sort(mx.random.randint(0, V, (1, 3, 8), key=mx.random.key(2)), axis=-1)
    w = mx.softmax(mx.random.normal((1, 3, 8), key=mx.random.key(3)), axis=-1)
    dense = mx.zeros((1, 3, V)).at[mx.arange(1)[:, None, None], mx.arange(3)[None, :, None], ids]
    dense = dense.add(w)
    full = model.self_conditioning_embeddings(dense)
    assert mx.allclose(model.gathered_self_conditioning(ids, w), full, atol=1e-5)
    # top_k_weights over the dense probabilities finds the same rows and weights.
    w2, ids2 = T.top_k_weights(dense, 8)
    assert mx.allclose(model.gathered_self_conditioning(ids2, w2), full, atol=1e-5)


def _state(fixed):
    z = mx.zeros(fixed.shape, dtype=mx.int32)
    return S.StepState(z, z, None, mx.zeros((fixed.shape[0],), mx.bool_), (), fixed, z)


def test_confidence_rule_accepts_confident_positions_and_at_least_one():
    rule = S.ConfidenceThreshold(0.9)
    probs = mx.array([[[0.95, 0.05], [0.5, 0.5], [0.6, 0.4]], [[0.7, 0.3], [0.8, 0.2], [0.5, 0.5]]])
    p = S.Proposal(probs, None, None, None, mx.array(1))
    free = mx.zeros((2, 3), dtype=mx.bool_)
    assert rule(p, _state(free)).tolist() == [[True, False, False], [False, True, False]]
    # The most confident *undecided* position: fixed ones are accepted anyway.
    fixed = mx.array([[False, False, False], [False, True, False]])
    assert rule(p, _state(fixed)).tolist()[1] == [True, False, False]
    assert isinstance(
        S.make_accept(DiffusionConfig().replace(mode="fast", commit_rule="confidence")),
        S.ConfidenceThreshold,
    )


def test_commit_argmax_and_commit_stable_choose_what_is_committed():
    fixed = mx.zeros((1, 4), dtype=mx.bool_)
    state = _state(fixed)._replace(canvas=mx.array([[5, 6, 7, 8]]), argmax=mx.array([[1, 6, 3, 8]]))
    accepted = mx.array([[True, True, True, False]])
    sample = S.commit(state, accepted)
    assert sample.fixed_ids.tolist() == [[5, 6, 7, 0]] and sample.canvas.tolist() == [[5, 6, 7, 8]]
    greedy = S.commit(state, accepted, use_argmax=True)
    assert greedy.fixed_ids.tolist() == [[1, 6, 3, 0]]
    assert greedy.canvas.tolist() == [[1, 6, 3, 8]] and greedy.argmax.tolist() == [[1, 6, 3, 8]]
    # Only positions whose argmax is unchanged since the previous step are committed.
    stable = S.commit(state, accepted, use_argmax=True, previous=mx.array([[1, 2, 3, 8]]))
    assert stable.fixed.tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError, match="commit_stable=True needs monotone_commit=True"):
        DiffusionConfig().replace(mode="fast", monotone_commit=False, commit_stable=True)


def _encoded(model, B=1, L=11):
    cache = model.make_cache()
    prefill(model, mx.random.randint(0, model.args.vocab_size, (B, L), key=mx.random.key(1)), cache)
    return cache


def test_denoise_active_is_denoise_where_the_kv_is_fresh():
    model = random_tiny_model()
    cache, C, V = _encoded(model, B=2), model.args.canvas_length, model.args.vocab_size
    x, y = mx.random.randint(0, V, (2, 2, C), key=mx.random.key(2))
    full = model.denoise(x, cache, apply_softcap=False)
    every = mx.broadcast_to(mx.arange(C), (2, C))
    logits, kv = model.denoise_active(x, every, cache, None)
    assert mx.allclose(logits, full, atol=1e-5)
    sub = mx.array([[3, 0, 7, 5], [1, 2, 6, 4]])
    part, _ = model.denoise_active(mx.take_along_axis(x, sub, 1), sub, cache, kv)
    want = mx.take_along_axis(full, sub[..., None], 1)
    assert mx.allclose(part, want, atol=1e-5)
    # The other positions' K/V from another canvas (stale) moves the logits.
    _, stale = model.denoise_active(y, every, cache, None)
    moved, _ = model.denoise_active(mx.take_along_axis(x, sub, 1), sub, cache, stale)
    assert not mx.allclose(moved, want, atol=1e-3)


def test_buckets_bound_the_shapes():
    assert [bucket(n, 256) for n in (1, 16, 17, 33, 100, 129, 256)] == [
        16,
        16,
        32,
        64,
        128,
        256,
        256,
    ]
    assert [bucket(n, 40) for n in (1, 17, 33, 40)] == [16, 32, 40, 40]
    live = mx.array([[False, True, False, True], [True, True, True, False]])
    assert S.active_positions(live, 3).tolist() == [[0, 1, 3], [0, 1, 2]]
