"""The sampler math on hand-made inputs, and the stop rule through the generation loop."""

import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import CanvasLayout
from mlx_diffgemma.diffusion import sampler as S
from mlx_diffgemma.diffusion.config import DiffusionConfig
from mlx_diffgemma.diffusion.steps import Block, DenoiseStep, generate_step


def test_entropy_bound_accepts_lowest_entropy_prefix():
    ent = mx.array([[0.3, 0.01, 0.05, 0.02, 0.2]])
    # sorted 0.01, 0.02, 0.05, 0.2, 0.3 -> cumsum minus self 0, .01, .03, .08, .28
    acc = S.entropy_bound_accept(ent, 0.1)
    assert acc.tolist() == [[False, True, True, True, True]]
    acc = S.entropy_bound_accept(ent, 0.05)
    assert acc.tolist() == [[False, True, True, True, False]]


def test_entropy_bound_always_accepts_the_lowest():
    ent = mx.array([[5.0, 4.0, 3.5], [1.0, 9.0, 2.0]])
    acc = S.entropy_bound_accept(ent, 1e-9)
    assert acc.tolist() == [[False, False, True], [True, False, False]]


def test_step_stats_match_torch():
    torch = pytest.importorskip("torch")
    logits = np.random.default_rng(0).normal(size=(2, 5, 50)).astype(np.float32) * 20
    proc = torch.from_numpy(logits) / 0.7
    ref = torch.distributions.Categorical(logits=proc)
    probs, ent, argmax = S.step_stats(mx.array(logits), mx.array(0.7))
    np.testing.assert_allclose(np.array(ent), ref.entropy().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.array(probs), torch.softmax(proc, -1).numpy(), rtol=1e-6, atol=1e-7
    )
    assert np.array(argmax).tolist() == proc.argmax(-1).tolist()
    # The model's softcap fused into the same pass gives the same numbers.
    raw = logits * 3
    capped = torch.tanh(torch.from_numpy(raw) / 30) * 30
    fused = S.step_stats(mx.array(raw), mx.array(0.7), softcap=30.0)
    separate = S.step_stats(mx.array(capped.numpy()), mx.array(0.7))
    for a, b in zip(fused, separate):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7)


def test_sample_categorical_inverts_the_cdf():
    rng = np.random.default_rng(0)
    p = rng.random((3, 4, 1024)) ** 8  # peaky, with many near-zero entries
    p[..., ::7] = 0.0  # zero-probability tokens must never be drawn
    p /= p.sum(-1, keepdims=True)
    u = rng.random((3, 4))
    ours = np.array(
        S.sample_categorical(mx.array(p, dtype=mx.float32), mx.array(u, dtype=mx.float32))
    )
    ref = [
        [np.searchsorted(np.cumsum(p[i, j]), u[i, j], side="right") for j in range(4)]
        for i in range(3)
    ]
    assert ours.tolist() == ref
    assert np.all(ours % 7 != 0)
    # A vocabulary that blocks do not divide, and the frequencies of many draws.
    q = np.array([0.5, 0.0, 0.2, 0.3, 0.0], dtype=np.float32)
    draws = S.sample_categorical(
        mx.broadcast_to(mx.array(q), (20000, 5)), mx.random.uniform(shape=(20000,))
    )
    freq = np.bincount(np.array(draws), minlength=5) / 20000
    np.testing.assert_allclose(freq, q, atol=0.015)


def test_renoise_touches_only_rejected_positions():
    accepted = mx.array([[True, False, True, False]])
    sampled = mx.array([[10, 11, 12, 13]])
    noise = mx.array([[90, 91, 92, 93]])
    assert S.renoise(accepted, sampled, noise).tolist() == [[10, 91, 12, 93]]


def test_temperature_schedule_endpoints_match_transformers():
    N, t_min, t_max = 48, 0.4, 0.8
    assert S.temperature(N, N, t_min, t_max).item() == pytest.approx(t_max, abs=1e-7)
    last = S.temperature(1, N, t_min, t_max).item()
    assert last == pytest.approx(t_min + (t_max - t_min) / N, abs=1e-7)
    assert last > t_min
    # transformers: t_min + (t_max - t_min) * (int32 step / N) in float32 tensor math
    for step in (1, 7, 48):
        frac = np.float32(step) / np.float32(N)
        ref = np.float32(np.float32(t_max - t_min) * frac) + np.float32(t_min)
        assert S.temperature(step, N, t_min, t_max).item() == float(ref)


def test_stability_and_confidence():
    a = mx.array([[1, 2, 3]])
    b = mx.array([[1, 2, 4]])
    assert S.is_stable((), a).tolist() == [True]  # threshold 0: always stable
    assert S.is_stable((a,), a).tolist() == [True]
    assert S.is_stable((b, a), a).tolist() == [False]
    ent = mx.array([[0.001, 0.002], [0.01, 0.0]])
    assert S.is_confident(ent, 0.005).tolist() == [True, False]


def test_pad_after_eos_keeps_first_eos():
    tokens = mx.array([[5, 1, 7, 1, 8], [5, 6, 7, 8, 9], [106, 3, 3, 3, 3]])
    out, first = S.pad_after_eos(tokens, mx.array([1, 106]), 0)
    assert out.tolist() == [[5, 1, 0, 0, 0], [5, 6, 7, 8, 9], [106, 0, 0, 0, 0]]
    assert first.tolist() == [1, -1, 0]


class ScriptedModel:
    """A stand-in model whose denoise returns a fixed, very peaky distribution."""

    def __init__(self, vocab=16, canvas=4, peaky=True, token=3):
        self.args = SimpleNamespace(
            vocab_size=vocab, canvas_length=canvas, final_logit_softcapping=None
        )
        self.peaky, self.token, self.encoded = peaky, token, []

    def make_cache(self):
        return []

    def encode(self, ids, cache):
        self.encoded.append(ids.tolist())

    def denoise(self, canvas, cache, self_conditioning_probs=None, apply_softcap=True):
        B, C = canvas.shape
        if self.peaky:
            logits = mx.full((B, C, self.args.vocab_size), -30.0)
            logits[..., self.token] = 30.0
            return logits
        return mx.zeros((B, C, self.args.vocab_size))


def run(model, **settings):
    config = DiffusionConfig(**{"max_new_tokens": 4, **settings})
    events = list(
        generate_step(
            mx.array([[2, 5, 6]]), model, config=config, key=mx.random.key(0), drafts=True
        )
    )
    return [e for e in events if isinstance(e, DenoiseStep)], [
        e for e in events if isinstance(e, Block)
    ]


@pytest.mark.parametrize("threshold", [0, 1, 2, 3])
def test_stop_needs_threshold_plus_one_identical_argmax_canvases(threshold):
    steps, blocks = run(ScriptedModel(), stability_threshold=threshold)
    # The history starts at -1, so the earliest stop is step threshold + 1.
    assert blocks[0].steps == threshold + 1 == len(steps)


def test_no_early_stop_without_confidence():
    steps, blocks = run(ScriptedModel(peaky=False), max_denoising_steps=5)
    assert blocks[0].steps == 5 and blocks[0].decoder_forwards.tolist() == [5]
    # uniform logits: entropy log(V) everywhere, so exactly one position is accepted per step
    assert all(s.accepted.sum().item() == 1 for s in steps)


def test_eos_ends_generation_and_pads():
    model = ScriptedModel(token=1)
    steps, blocks = run(model, max_new_tokens=12, eos_token_id=[1])
    assert len(blocks) == 1 and blocks[0].tokens.tolist() == [[1, 0, 0, 0]]
    assert blocks[0].finished.tolist() == [True]


def test_canvases_are_reencoded_at_block_boundaries():
    model = ScriptedModel(token=7)
    _, blocks = run(model, max_new_tokens=9)
    assert len(blocks) == 3  # ceil(9 / 4); max_new_tokens only picks the canvas count
    # prompt, then every appended canvas but the last
    assert model.encoded == [[[2, 5, 6]], [[7, 7, 7, 7]], [[7, 7, 7, 7]]]


def test_same_key_same_canvas():
    a = S.RandomDraws(mx.random.key(3), 100).initial_canvas((1, 8))
    b = S.RandomDraws(mx.random.key(3), 100).initial_canvas((1, 8))
    c = S.RandomDraws(mx.random.key(4), 100).initial_canvas((1, 8))
    assert a.tolist() == b.tolist() != c.tolist()
    assert 0 <= mx.min(a).item() and mx.max(a).item() < 100


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="stability_threshold must be an integer >= 0"):
        DiffusionConfig(stability_threshold=-1)
    with pytest.raises(ValueError, match="confidence_threshold must be a number > 0"):
        DiffusionConfig(confidence_threshold=0)
    with pytest.raises(ValueError, match="t_max must be greater than t_min"):
        DiffusionConfig(t_min=0.8, t_max=0.4)
    with pytest.raises(ValueError, match="max_denoising_steps must be a positive integer"):
        DiffusionConfig(max_denoising_steps=0)


def test_generation_config_precedence(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        '{"max_denoising_steps": 12, "sampler_config": {"entropy_bound": 0.3}, "eos_token_id": 106}'
    )
    cfg = DiffusionConfig.from_pretrained(tmp_path)
    assert (cfg.max_denoising_steps, cfg.entropy_bound, cfg.eos_token_id) == (12, 0.3, (106,))
    assert cfg.t_max == 0.8  # transformers' default where the file is silent
    assert cfg.replace(max_denoising_steps=5, t_min=None).max_denoising_steps == 5
    assert math.isclose(cfg.replace(t_min=None).t_min, 0.4)


def test_clamped_positions_are_fixed_accepted_and_free_of_entropy_budget():
    model = ScriptedModel(peaky=False)  # uniform logits: only one free position per step
    layout = CanvasLayout((9, 0, 11, 0), (True, False, True, False))
    config = DiffusionConfig(max_new_tokens=4, max_denoising_steps=5)
    events = list(
        generate_step(
            mx.array([[2, 5]]),
            model,
            config=config,
            key=mx.random.key(1),
            drafts=True,
            layout=layout,
        )
    )
    steps = [e for e in events if isinstance(e, DenoiseStep)]
    for s in steps:
        assert [s.canvas[0, 0].item(), s.canvas[0, 2].item()] == [9, 11]
        assert [s.argmax[0, 0].item(), s.argmax[0, 2].item()] == [9, 11]
        assert s.accepted[0, 0].item() and s.accepted[0, 2].item()
        # the clamps cost nothing: exactly one free position is still accepted
        assert s.accepted.sum().item() == 3
    block = events[-1]
    assert [block.tokens[0, 0].item(), block.tokens[0, 2].item()] == [9, 11]
