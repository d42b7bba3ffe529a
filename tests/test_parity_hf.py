"""Parity with transformers' DiffusionGemma (the numerical oracle), in float32.

`python -m pytest -s -q tests/test_parity_hf.py` prints the measured figures.
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers.models.diffusion_gemma")

import mlx.core as mx  # noqa: E402
from hf_reference import HFDenoiser, build_hf_checkpoint, load_hf, run_scenario, scenario_prompt  # noqa: E402

from mlx_diffgemma import load_model  # noqa: E402
from mlx_diffgemma.cache import SlidingWindowCache  # noqa: E402
from mlx_diffgemma.diffusion.steps import Block, DenoiseStep, generate_step  # noqa: E402

# Against transformers (the torch oracle): the full suite only (README: two tiers).
pytestmark = pytest.mark.slow

# fp32 reduction order alone gives ~1e-4 on logits of magnitude up to 30.
TOL = 1e-3


@pytest.fixture(scope="module", params=["release", "per_layer"])
def pair(request, tmp_path_factory):
    path = build_hf_checkpoint(tmp_path_factory.mktemp(request.param), style=request.param, seed=0)
    return request.param, load_hf(path), load_model(path)


def canvas_of(seed, vocab, length):
    return np.random.default_rng(seed).integers(0, vocab, (1, length))


def compare(name, ours, ref):
    err = float(np.abs(np.array(ours) - ref).max())
    print(f"\n[parity] {name}: max|dlogit| = {err:.2e} (max|logit| = {np.abs(ref).max():.1f})")
    assert err <= TOL, f"{name}: max |dlogit| {err} > {TOL}"
    return err


def test_denoise_logits_match_transformers(pair):
    style, hf, ours = pair
    prompt = scenario_prompt(length=20, seed=0)  # longer than the window (8)
    V, C = ours.args.vocab_size, ours.args.canvas_length
    ref = HFDenoiser(hf, prompt)
    cache = ours.make_cache()
    ours.encode(mx.array(prompt), cache)

    canvas = canvas_of(1, V, C)
    first = ref.denoise(canvas)
    compare(f"{style}: no self-conditioning", ours.denoise(mx.array(canvas), cache), first)

    sc = first / 0.7  # the sampler conditions on temperature-scaled logits
    compare(
        f"{style}: self-conditioning",
        ours.denoise(mx.array(canvas), cache, self_conditioning_logits=mx.array(sc)),
        ref.denoise(canvas, sc),
    )

    block = canvas_of(2, V, C)
    ref.append(block)
    ours.encode(mx.array(block), cache)
    canvas = canvas_of(3, V, C)
    compare(
        f"{style}: after a second block",
        ours.denoise(mx.array(canvas), cache, self_conditioning_logits=mx.array(sc)),
        ref.denoise(canvas, sc),
    )


def test_cache_matches_transformers(pair):
    _, hf, ours = pair
    prompt = scenario_prompt(length=20, seed=0)
    ref = HFDenoiser(hf, prompt).cache_kv()
    cache = ours.make_cache()
    ours.encode(mx.array(prompt), cache)
    for i, (r, c) in enumerate(zip(ref, cache)):
        keys, values = c.state[:2]
        n = c.offset if not isinstance(c, SlidingWindowCache) else c.size()
        np.testing.assert_allclose(
            np.array(keys[..., :n, :]), r["keys"], atol=1e-4, err_msg=f"layer {i}"
        )
        np.testing.assert_allclose(
            np.array(values[..., :n, :]), r["values"], atol=1e-4, err_msg=f"layer {i}"
        )


def test_window_off_by_one_is_caught(pair, monkeypatch):
    """The decoder must see exactly W-1 cached tokens; W (a bug other ports shipped) fails."""
    _, hf, ours = pair
    prompt = scenario_prompt(length=20, seed=0)
    canvas = canvas_of(1, ours.args.vocab_size, ours.args.canvas_length)
    ref = HFDenoiser(hf, prompt).denoise(canvas)
    monkeypatch.setattr(
        SlidingWindowCache, "__init__", lambda self, max_size: _init_window(self, max_size + 1)
    )
    cache = ours.make_cache()
    ours.encode(mx.array(prompt), cache)
    err = np.abs(np.array(ours.denoise(mx.array(canvas), cache)) - ref).max()
    print(f"\n[parity] window W instead of W-1: max|dlogit| = {err:.2f}")
    assert err > 100 * TOL


def _init_window(self, max_size):
    self.max_size, self.keys, self.values, self.offset = max_size, None, None, 0


class ReplayDraws:
    """transformers' random draws, in the order its generate made them."""

    def __init__(self, draws):
        self.queues = {
            kind: [mx.array(d["value"]) for d in draws if d["kind"] == kind]
            for kind in ("init", "multinomial", "renoise")
        }

    def _pop(self, kind):
        return self.queues[kind].pop(0)

    def initial_canvas(self, shape):
        return self._pop("init")

    def noise(self, shape):
        return self._pop("renoise")

    def sample(self, probs):
        return self._pop("multinomial")


@pytest.fixture(scope="module", params=["eos_run", "early_stop_run"])
def scenario(request, tmp_path_factory):
    return run_scenario(request.param, tmp_path_factory.mktemp("scenarios"))


def test_whole_generation_matches_transformers(scenario):
    trace = scenario["trace"]
    model = load_model(scenario["path"])
    config = model.generation_config.replace(**scenario["generate_kwargs"])
    draws = ReplayDraws(trace["draws"])
    events = list(
        generate_step(
            mx.array(scenario["input_ids"]), model, config=config, draws=draws, drafts=True
        )
    )
    steps = [e for e in events if isinstance(e, DenoiseStep)]
    blocks = [e for e in events if isinstance(e, Block)]
    ref_steps = [s for c in trace["canvases"] for s in c["steps"]]

    assert [b.steps for b in blocks] == trace["num_steps"]
    assert len(steps) == len(ref_steps)
    for i, (s, r) in enumerate(zip(steps, ref_steps)):
        assert np.array_equal(np.array(s.accepted), r["accepted_mask"]), f"accept mask, step {i}"
        assert np.array_equal(np.array(s.argmax), r["argmax"]), f"argmax, step {i}"
        assert np.array_equal(np.array(s.canvas), r["canvas_out"]), f"canvas, step {i}"
    for b, c in zip(blocks, trace["canvases"]):
        assert np.array_equal(np.array(b.tokens), c["final"]), f"canvas {b.block}"
    sequence = np.concatenate([scenario["input_ids"]] + [np.array(b.tokens) for b in blocks], -1)
    assert np.array_equal(sequence, trace["sequences"])
    assert all(not q for q in draws.queues.values()), "every reference draw is used"

    new = sequence[:, scenario["input_ids"].shape[1] :]
    tpf = (new != config.pad_token_id).sum(-1) / np.array(blocks[-1].decoder_forwards)
    np.testing.assert_allclose(tpf, trace["tokens_per_forward"], rtol=1e-6)
    stopped_early = [c["early_stop"] for c in trace["canvases"]]
    print(
        f"\n[parity] {scenario['name']}: {len(blocks)} canvases, steps {trace['num_steps']}, "
        f"early stop {stopped_early}, tokens/forward {tpf[0]:.4f}: identical"
    )
