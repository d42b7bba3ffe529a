"""Fast mode's loops (FastLoop, CompactLoop) end to end: what each setting changes in a
generation, and what it keeps (layouts, clamps, the draws where nothing differs)."""

import mlx.core as mx
import pytest
from click.testing import CliRunner
from conftest import random_tiny_model

from mlx_diffgemma.diffusion import sampler as S
from mlx_diffgemma.diffusion.canvas import CanvasLayout
from mlx_diffgemma.diffusion.config import DiffusionConfig
from mlx_diffgemma.diffusion.steps import Block, DenoiseStep, generate_step, make_loop, prefill
from mlx_diffgemma.generate import generate, generate_command, resolve_config


def test_monotone_commit_never_revises_an_accepted_token():
    model = random_tiny_model()
    cfg = DiffusionConfig().replace(
        max_new_tokens=8,
        max_denoising_steps=10,
        mode="fast",
        monotone_commit=True,
        entropy_bound=2.0,
    )
    drafts = [
        e
        for e in generate_step(
            mx.array([[2, 9]]), model, config=cfg, key=mx.random.key(0), drafts=True
        )
        if isinstance(e, DenoiseStep)
    ]
    kept = mx.zeros((1, 8), dtype=mx.bool_)
    value = mx.zeros((1, 8), dtype=mx.int32)
    for d in drafts:  # a token accepted (its sample) is the draft and input from then on
        kept = kept | d.accepted
        value = mx.where(d.accepted, d.canvas, value)
        for later in (d.argmax, d.canvas):
            assert mx.array_equal(mx.where(kept, later, 0), mx.where(kept, value, 0))
    assert kept.any()
    # A canvas stops at once when its every position is committed (not a step later).
    assert len(drafts) < cfg.max_denoising_steps and drafts[-1].accepted.all()
    assert not any(d.accepted.all() for d in drafts[:-1])


def test_fast_mode_end_to_end(tiny):
    model, tok = tiny
    text = generate(model, tok, "Hi", seed=0, mode="fast", max_tokens=16)
    assert isinstance(text, str) and text
    alone = generate(
        model,
        tok,
        "Hi",
        seed=0,
        mode="fast",
        top_k=0,
        self_conditioning_top_k=0,
        monotone_commit=False,
        canvas_shrink=0,
        max_tokens=16,
    )
    assert alone == generate(model, tok, "Hi", seed=0, max_tokens=16)  # every setting off
    blocks = [
        e
        for e in generate_step(
            mx.array([[2, 9]] * 2),
            model,
            key=mx.random.key(1),
            config=resolve_config(model, mode="fast"),
        )
        if isinstance(e, Block)
    ]
    assert blocks and blocks[0].tokens.shape == (2, model.args.canvas_length)


def test_canvas_shrink_cuts_the_last_canvas_to_the_tokens_left():
    model = random_tiny_model()
    cfg = DiffusionConfig().replace(
        max_new_tokens=11, max_denoising_steps=2, mode="fast", canvas_shrink=2
    )
    blocks = generate_step(mx.array([[2, 9]]), model, config=cfg, key=mx.random.key(0))
    assert [b.tokens.shape[1] for b in blocks] == [8, 3]
    blocks = generate_step(
        mx.array([[2, 9]]), model, config=cfg.replace(canvas_shrink=5), key=mx.random.key(0)
    )
    assert [b.tokens.shape[1] for b in blocks] == [8, 5]


def test_removed_settings_are_refused(tiny_checkpoint):
    # eos_tail_cut and reopen are on no trained toy's Pareto front, base or distilled, and
    # no setting on one builds on them (benchmarks/README.md, issue 23): removed.
    for name in ("eos_tail_cut", "reopen"):
        with pytest.raises(ValueError, match=f"Unknown sampler setting '{name}'"):
            DiffusionConfig().replace(mode="fast", monotone_commit=True, repair=1, **{name: True})
        flag = "--" + name.replace("_", "-")
        result = CliRunner().invoke(
            generate_command, ["--model", str(tiny_checkpoint), "-p", "Hi", "--mode", "fast", flag]
        )
        assert result.exit_code == 2 and f"No such option '{flag}'" in result.output


def test_commit_stable_commits_nothing_at_the_first_step():
    model = random_tiny_model()
    cfg = DiffusionConfig().replace(
        max_new_tokens=8,
        max_denoising_steps=4,
        mode="fast",
        entropy_bound=50.0,
        monotone_commit=True,
        commit_stable=True,
    )
    steps = generate_step(mx.array([[2, 9]]), model, config=cfg, key=mx.random.key(0), drafts=True)
    first = next(e for e in steps if isinstance(e, DenoiseStep))
    # Everything is accepted (a huge bound), so a plain monotone commit would stop here.
    assert first.accepted.all()
    plain = generate_step(
        mx.array([[2, 9]]),
        model,
        config=cfg.replace(commit_stable=False),
        key=mx.random.key(0),
    )
    assert (
        next(plain).steps == 1
        and next(
            iter(generate_step(mx.array([[2, 9]]), model, config=cfg, key=mx.random.key(0)))
        ).steps
        >= 2
    )


def _encoded(model, B=1, L=11):
    cache = model.make_cache()
    prefill(model, mx.random.randint(0, model.args.vocab_size, (B, L), key=mx.random.key(1)), cache)
    return cache


def _monotone(**kw) -> DiffusionConfig:
    """Fast mode with monotone commit and top-k 8 (both top-k settings), plus `kw`."""
    return DiffusionConfig().replace(mode="fast", top_k=8, monotone_commit=True, **kw)


def _blocks(model, config, prompt, seed=0):
    steps = generate_step(prompt, model, config=config, key=mx.random.key(seed))
    return [e for e in steps if isinstance(e, Block)]


def test_compaction_within_one_bucket_changes_nothing():
    model = random_tiny_model()  # canvas 8 < the smallest bucket: every position is forwarded
    cfg = _monotone(max_new_tokens=16, max_denoising_steps=6)
    prompt = mx.array([[2, 9, 4]] * 2)
    plain, compact = _blocks(model, cfg, prompt), _blocks(model, cfg.replace(compact=True), prompt)
    for a, b in zip(plain, compact):
        assert mx.array_equal(a.tokens, b.tokens) and a.steps == b.steps
        assert mx.array_equal(a.positions_forwarded, b.positions_forwarded)


def test_compaction_forwards_only_live_positions_in_bucket_shapes():
    model = random_tiny_model(canvas_length=40)
    cfg = _monotone(max_new_tokens=80, max_denoising_steps=10, entropy_bound=3.0)
    prompt = mx.array([[2, 9, 4]])
    plain, compact = _blocks(model, cfg, prompt), _blocks(model, cfg.replace(compact=True), prompt)
    assert plain[-1].forward_shapes == 1
    forwards = compact[-1].decoder_forwards.item()
    positions = compact[-1].positions_forwarded.item()
    # The first step of each canvas forwards all 40, the later ones a bucket of 16/32/40.
    assert 2 * 40 + (forwards - 2) * 16 <= positions < forwards * 40
    assert 2 <= compact[-1].forward_shapes <= 3
    assert [b.tokens.shape for b in compact] == [(1, 40)] * 2
    with pytest.raises(ValueError, match="compact=True needs top_k > 0 and self_conditioning"):
        DiffusionConfig().replace(mode="fast", monotone_commit=True, compact=True, top_k=0)
    with pytest.raises(ValueError, match="compact=True needs monotone_commit=True"):
        DiffusionConfig().replace(mode="fast", compact=True)


def test_repair_is_one_more_forward_whose_argmax_is_the_draft():
    model = random_tiny_model()
    cfg = DiffusionConfig().replace(max_new_tokens=8, max_denoising_steps=3, mode="fast", repair=1)
    C, V, H = model.args.canvas_length, model.args.vocab_size, model.args.hidden_size
    cache = _encoded(model)
    loop = make_loop(model, cfg, S.RandomDraws(mx.random.key(0), V), S.make_accept(cfg), 1)
    layout = CanvasLayout(ids=(0, 0, 77), fixed=(False, False, True))
    plan = layout.plan(0, C)
    draft = mx.random.randint(0, V, (1, C), key=mx.random.key(3))
    cond = mx.random.normal((1, C, H), key=mx.random.key(4))
    free = mx.zeros((1, C), mx.bool_)
    state = S.StepState(draft, draft, cond, mx.array([False]), (), free, draft)
    out = loop.repair(state, plan, cache)
    logits = model.denoise(draft, cache, self_conditioning_embeddings=cond)
    want = mx.argmax(logits, axis=-1)
    assert out.argmax.tolist()[0] == want.tolist()[0][:2] + [77] + want.tolist()[0][3:]
    assert loop.forwards.tolist() == [1] and loop.positions_forwarded.tolist() == [C]
    prompt = mx.array([[2, 9]])
    plain, repaired = _blocks(model, cfg.replace(repair=0), prompt), _blocks(model, cfg, prompt)
    assert repaired[0].decoder_forwards.item() == plain[0].decoder_forwards.item() + 1


def test_compaction_and_repair_keep_a_layouts_clamps_and_token_classes():
    model = random_tiny_model(canvas_length=40)
    V = model.args.vocab_size
    masks = mx.zeros((1, V), mx.bool_).at[0, mx.array([5, 6, 7])].add(True)
    layout = CanvasLayout(
        ids=(99,) + (0,) * 39,
        fixed=(True,) + (False,) * 39,
        token_class=(-1,) + (0,) * 39,
        token_masks=masks,
    )
    cfg = _monotone(
        max_new_tokens=40, max_denoising_steps=10, compact=True, repair=1, entropy_bound=1.0
    )
    steps = generate_step(
        mx.array([[2, 9, 4]]), model, config=cfg, key=mx.random.key(0), layout=layout
    )
    block = next(e for e in steps if isinstance(e, Block))
    row = block.tokens.tolist()[0]
    assert row[0] == 99 and set(row[1:]) <= {5, 6, 7}
    assert block.positions_forwarded.item() < block.decoder_forwards.item() * 40
