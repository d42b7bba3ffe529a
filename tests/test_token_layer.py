"""The token layer's pieces: canvas layouts and plans, pluggable acceptance, the EOS index,
the generation stream across threads, and the bad inputs it refuses."""

import re
import threading
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import CanvasLayout, PromptCache, stream_generate
from mlx_diffgemma.diffusion import sampler as S
from mlx_diffgemma.diffusion.canvas import CanvasPlan
from mlx_diffgemma.diffusion.config import DiffusionConfig
from mlx_diffgemma.diffusion.loop import compiled_update
from mlx_diffgemma.diffusion.steps import Block, DenoiseStep, generate_step

# --- layouts and plans --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (((1, 2, 3), (True, False)), "CanvasLayout.fixed has 2 entries; ids has 3"),
        (((1, 2), (True, False), (True, False)), "cannot be both fixed and seeded"),
        (((1, 2), (False, False), (), (0, -1)), "token_class needs token_masks"),
        (
            ((1, 2), (False, False), (), (0, 1), mx.ones((1, 8), mx.bool_)),
            "token_class 1 is out of range for 1 token_masks rows",
        ),
        (
            ((1, 2), (False, False), (), (0, 1), mx.array([[True] * 8, [False] * 8])),
            "token_masks row 1 allows no token",
        ),
    ],
)
def test_layout_refuses_inconsistent_fields(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CanvasLayout(*args)


def test_layout_check_names_what_does_not_fit():
    layout = CanvasLayout((1, 99, 7), (True, False, False), (False, False, True))
    layout.check(vocab_size=16, max_tokens=3)  # 99 is at a free position: never used
    with pytest.raises(ValueError, match="The layout has 3 positions but max_tokens is 2"):
        layout.check(vocab_size=16, max_tokens=2)
    with pytest.raises(ValueError, match=r"Layout token id 7 at position 2 .*\(vocab_size 7\)"):
        layout.check(vocab_size=7, max_tokens=3)
    masked = CanvasLayout((0, 0), (False, False), (), (0, -1), mx.ones((1, 8), mx.bool_))
    with pytest.raises(ValueError, match="token_masks has 8 columns; the model's vocab_size is 9"):
        masked.check(vocab_size=9, max_tokens=2)


def test_plan_per_canvas_fixed_seeded_allowed_and_free_past_the_end():
    masks = mx.array([[i in (3, 4) for i in range(6)]])
    layout = CanvasLayout(
        (5, 1, 2, 4, 0),
        (True, False, False, True, False),
        (False, True, False, False, False),
        (-1, -1, 0, -1, 0),
        masks,
    )
    first, second, third = (layout.plan(b, 3) for b in range(3))
    assert first.fixed.tolist() == [[True, False, False]]
    assert first.seeded.tolist() == [[False, True, False]]
    assert first.ids.tolist() == [[5, 1, 2]]
    assert first.allowed.shape == (1, 3, 6)
    assert first.allowed[0, 2].tolist() == masks[0].tolist() and first.allowed[0, 0].all()
    assert first.start(mx.array([[9, 9, 9], [8, 8, 8]])).tolist() == [[5, 1, 9], [5, 1, 8]]
    assert second.fixed.tolist() == [[True, False, False]] and second.ids.tolist() == [[4, 0, 0]]
    assert second.allowed[0, 1].tolist() == masks[0].tolist()
    free = CanvasPlan.free(3)
    for a, b in zip(third, free):  # past the end of the layout
        assert (a is None and b is None) or a.tolist() == b.tolist()


# --- the acceptance rule ------------------------------------------------------------------


class Flat:
    """Flat logits: every position has entropy ln V, so the entropy bound accepts one."""

    def __init__(self, vocab=16, canvas=4):
        self.args = SimpleNamespace(
            vocab_size=vocab, canvas_length=canvas, final_logit_softcapping=None
        )

    def make_cache(self):
        return []

    def encode(self, ids, cache):
        pass

    def denoise(self, canvas, cache, **kw):
        return mx.zeros((*canvas.shape, self.args.vocab_size))


def drafts(model, config, **kw):
    events = generate_step(mx.array([[2]]), model, config=config, drafts=True, **kw)
    return [e for e in events if isinstance(e, DenoiseStep)]


def test_a_custom_accept_rule_decides_what_survives():
    config = DiffusionConfig(max_new_tokens=4, max_denoising_steps=3)
    default = drafts(Flat(), config, key=mx.random.key(0))
    assert [s.accepted.sum().item() for s in default] == [1, 1, 1]

    # Accept a growing prefix, from the steps left: 1, 2, then 3 positions; the fixed
    # last position is accepted whatever the rule says.
    def prefix(proposal, state):
        n = 3 + 1 - proposal.steps_left
        return mx.arange(proposal.entropy.shape[1])[None] < n

    layout = CanvasLayout((0, 0, 0, 7), (False, False, False, True))
    steps = drafts(Flat(), config, key=mx.random.key(0), accept=prefix, layout=layout)
    assert [s.accepted[0].tolist() for s in steps] == [
        [True, False, False, True],
        [True, True, False, True],
        [True, True, True, True],
    ]
    assert all(s.canvas[0, 3].item() == 7 for s in steps)


def test_equal_entropy_bound_rules_share_one_compiled_step():
    rule = S.make_accept(DiffusionConfig(entropy_bound=0.25))
    assert rule == S.EntropyBound(0.25)
    assert compiled_update(rule, 0.005) is compiled_update(S.EntropyBound(0.25), 0.005)


# --- EOS from the token layer -------------------------------------------------------------


class Rows:
    """Canvas k of row b is `canvases[k][b]`, as very peaky logits (one step per canvas)."""

    def __init__(self, canvases, vocab=16):
        self.canvases, self.encodes = canvases, 0
        self.args = SimpleNamespace(
            vocab_size=vocab, canvas_length=len(canvases[0][0]), final_logit_softcapping=None
        )

    def make_cache(self):
        return []

    def encode(self, ids, cache):
        self.encodes += 1  # the prompt, then each canvas before the next one

    def denoise(self, canvas, cache, **kw):
        ids = mx.array(self.canvases[self.encodes - 1])
        return mx.where(mx.arange(self.args.vocab_size) == ids[..., None], 30.0, -30.0)


def test_blocks_carry_each_rows_first_eos():
    model = Rows([[[5, 6, 1, 1], [5, 6, 7, 8]], [[9, 9, 9, 9], [4, 1, 3, 1]], [[2] * 4] * 2])
    config = DiffusionConfig(
        max_new_tokens=12, max_denoising_steps=3, stability_threshold=0, eos_token_id=(1,)
    )
    events = generate_step(mx.array([[2], [2]]), model, config=config, key=mx.random.key(0))
    blocks = [e for e in events if isinstance(e, Block)]
    assert len(blocks) == 2  # every row ended: the third canvas never runs
    assert blocks[0].eos_index == (2, -1)
    assert blocks[0].tokens.tolist() == [[5, 6, 1, 0], [5, 6, 7, 8]]
    assert blocks[1].eos_index == (-1, 1)  # row 0 ended before: a canvas of pad
    assert blocks[1].tokens.tolist() == [[0, 0, 0, 0], [4, 1, 0, 0]]
    assert blocks[1].finished.tolist() == [True, True]
    assert blocks[1].step_syncs == 2  # one per step, the EOS index included


# --- threads and bad inputs ---------------------------------------------------------------


def test_generation_runs_the_same_from_another_thread(tiny):
    model, tok = tiny

    def ids():
        return [i for r in stream_generate(model, tok, "Hi", seed=5) for i in r.token_ids]

    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("thread", ids()))
    worker.start()
    worker.join()
    assert out["thread"] == ids()


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "7", True])
def test_seed_out_of_range_is_a_value_error(tiny, seed):
    model, tok = tiny
    message = f"seed must be an integer from 0 to 4294967295 (2**32 - 1); got {seed!r}."
    with pytest.raises(ValueError, match=re.escape(message)):
        next(stream_generate(model, tok, "Hi", seed=seed))


def test_the_largest_seed_and_numpy_seeds_work(tiny):
    model, tok = tiny
    assert next(stream_generate(model, tok, "Hi", seed=2**32 - 1)).seed == 2**32 - 1
    assert next(stream_generate(model, tok, "Hi", seed=np.int64(3))).seed == 3


@pytest.mark.parametrize("bad", [262144, 300000, -1])
def test_prompt_ids_outside_the_vocabulary_are_refused(tiny, bad):
    model, tok = tiny
    message = (
        f"Prompt token id {bad} at position 1 is not in the vocabulary: ids run from 0 to "
        "262143 (vocab_size 262144)."
    )
    cache = PromptCache(model)
    for prompt in ([2, bad, 5], mx.array([2, bad, 5])):
        with pytest.raises(ValueError, match=re.escape(message)):
            next(stream_generate(model, tok, prompt, seed=0, prompt_cache=cache))
    assert len(cache) == 0 and {c.offset for c in cache.layers} == {0}  # nothing written
    config = model.generation_config
    with pytest.raises(ValueError, match=re.escape(message)):
        next(generate_step(mx.array([[2, bad, 5]]), model, config=config, key=mx.random.key(0)))


def test_layout_ids_outside_the_vocabulary_are_refused(tiny):
    model, tok = tiny
    layout = CanvasLayout((5, 300000), (True, True))
    with pytest.raises(ValueError, match="Layout token id 300000 at position 1"):
        next(stream_generate(model, tok, "Hi", seed=0, layout=layout))


def test_a_large_batch_denoises_split_over_cpu_lanes_with_the_same_logits(tiny):
    from mlx_diffgemma.diffusion.lanes import split_denoise
    from mlx_diffgemma.diffusion.steps import generation_stream, prefill

    model, _ = tiny
    B, C, V = 6, model.args.canvas_length, model.args.vocab_size
    cache = model.make_cache()
    prefill(model, mx.random.randint(0, V, (B, 9), key=mx.random.key(0)), cache)
    with mx.stream(mx.cpu):  # two lanes, whatever this machine's core count
        lanes = [generation_stream(), mx.new_stream(mx.cpu)]
    canvas = mx.random.randint(0, V, (B, C), key=mx.random.key(2))
    probs = mx.softmax(mx.random.normal((B, C, V), key=mx.random.key(3)), axis=-1)
    split = split_denoise(model, canvas, cache, lanes, self_conditioning_probs=probs)
    whole = model.denoise(canvas, cache, self_conditioning_probs=probs, apply_softcap=False)
    assert split.shape == whole.shape and mx.allclose(split, whole, atol=1e-4).item()
    # Fewer than two rows per lane: one pass (nothing to split).
    one = split_denoise(model, canvas, cache, lanes * 2, self_conditioning_probs=probs)
    assert mx.array_equal(one, whole).item()


def test_a_batch_split_over_lanes_generates_from_its_first_step():
    # The first step has no conditioning to split by rows (a regression).
    from conftest import random_tiny_model

    model = random_tiny_model()
    config = DiffusionConfig(max_new_tokens=8, max_denoising_steps=2)
    prompt = mx.random.randint(3, 100, (8, 5), key=mx.random.key(0))
    for cfg in (config, config.replace(mode="fast")):
        steps = generate_step(prompt, model, config=cfg, key=mx.random.key(1))
        block = next(e for e in steps if isinstance(e, Block))
        assert block.tokens.shape == (8, 8)
