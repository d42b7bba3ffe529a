"""Few-step distillation: teacher trajectories, the certainty objective, the command."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import random_tiny_model

from mlx_diffgemma.diffusion.config import DiffusionConfig
from mlx_diffgemma.diffusion.steps import Block, DenoiseStep, generate_step, prefill
from mlx_diffgemma.tuner import trajectories as T
from mlx_diffgemma.tuner.certainty import (
    Certainty,
    StepBatches,
    StepDraws,
    certainty_terms,
    example_of,
    student_logits,
)
from mlx_diffgemma.tuner.data import make_batch

CONFIG = DiffusionConfig(max_new_tokens=16, max_denoising_steps=4, eos_token_id=(1,))


def test_teacher_trajectories_are_the_exact_samplers_runs(tmp_path):
    model = random_tiny_model()
    prompts = [[2, 5, 9], [2, 7, 3], [2, 11, 4, 6]]  # two lengths: two batches
    runs = T.teacher_trajectories(model, prompts, CONFIG, seed=7, report=lambda *a, **k: None)
    for b, rows in enumerate([[0, 1], [2]]):
        prompt = mx.array([prompts[r] for r in rows])
        events = list(
            generate_step(prompt, model, config=CONFIG, key=mx.random.key(7 + b), drafts=True)
        )
        blocks = [e for e in events if isinstance(e, Block)]
        drafts = [e for e in events if isinstance(e, DenoiseStep)]
        for i, r in enumerate(rows):
            run = runs[r]
            assert run.prompt == prompts[r]
            assert (
                run.tokens
                == [t for blk in blocks for t in blk.tokens[i].tolist()][: len(run.tokens)]
            )
            # Step s + 1's input is step s's output canvas (the first: the random start).
            for k in range(len(run.steps)):
                steps = [d for d in drafts if d.block == k]
                for s in range(1, int(run.steps[k])):
                    assert run.states[k, s].tolist() == steps[s - 1].canvas[i].tolist()
    # A round trip through the cache file.
    T.save(tmp_path / "t.npz", runs)
    back = T.load(tmp_path / "t.npz", model.args.canvas_length)
    for a, b in zip(runs, back):
        assert a.prompt == b.prompt and a.tokens == b.tokens
        assert (a.steps == b.steps).all() and (a.states == b.states).all()
    key = T.cache_key({"w": 1}, prompts, CONFIG, 7)
    assert key == T.cache_key({"w": 1}, prompts, CONFIG, 7)
    assert key != T.cache_key({"w": 1}, prompts, CONFIG, 8)
    assert key != T.cache_key({"w": 2}, prompts, CONFIG, 7)


def _draws(model, batch, rng):
    B, C, V = batch.tokens.shape[0], model.args.canvas_length, model.args.vocab_size
    return StepDraws(
        canvas=mx.array([0, 1], dtype=mx.int32),
        x=mx.array(rng.integers(0, V, (B, C)).astype(np.int32)),
        prev=mx.array(rng.integers(0, V, (B, C)).astype(np.int32)),
        has_prev=mx.array([True, False]),
        temp=mx.array([0.7, 0.8]),
        prev_temp=mx.array([0.75, 0.85]),
    )


def test_certainty_loss_and_gradient_match_finite_differences():
    """The objective's value by hand and its gradient against central differences (an
    independent check of the autodiff through both passes and the stop-gradients). The
    weights are float64; `decoder_pass` returns float32 logits, hence eps 1e-2."""
    model = random_tiny_model(vocab_size=64)
    model.set_dtype(mx.float64)
    for layer in model.layers:  # GatherMM runs float32 only; dense experts run float64
        layer.experts.dense = True
    C = model.args.canvas_length
    rng = np.random.default_rng(0)
    answer = list(rng.integers(3, 64, 2 * C))
    runs = [
        T.Trajectory([2, 5, 9, 4], answer, None, np.array([2, 2])),
        T.Trajectory([2, 7], list(rng.integers(3, 64, C - 3)) + [1, 0, 0], None, np.array([3])),
    ]
    batch = make_batch([example_of(r, (1,)) for r in runs], C, pad_id=0)
    assert batch.tokens[1, 2 + C - 3].item() == 1  # the answer ends at its EOS, then pad
    draws = _draws(model, batch, rng)
    # Row 0 trains canvas 0, which sees the prompt only: make half its targets the
    # student's own argmax, so the certainty term has positions to sharpen.
    logits = student_logits(model, batch, draws)[0]
    answer[: C // 2] = logits[0, : C // 2].argmax(axis=-1).tolist()
    runs[0] = runs[0]._replace(tokens=answer)
    batch = make_batch([example_of(r, (1,)) for r in runs], C, pad_id=0)
    obj = Certainty(max_steps=3, certainty_weight=0.7, encoder_loss_weight=0.3)
    ce, cert, enc, _ = certainty_terms(model, batch, draws, obj)
    logits, target, _ = student_logits(model, batch, draws)
    right = np.array(logits.argmax(axis=-1) == target)
    assert right[0, : C // 2].all() and cert.item() > 0
    p = np.exp(np.array(logits / draws.temp[:, None, None], dtype=np.float64))
    p /= p.sum(-1, keepdims=True)
    ent = -(p * np.log(p)).sum(-1)
    assert abs(cert.item() - ent[right].mean()) < 1e-5

    # Row 0's logits are what the sampler computes at that step: `denoise` on the step's
    # input, conditioned on the previous step's input's probabilities at its temperature.
    cache = model.make_cache()
    prefill(model, mx.array([runs[0].prompt]), cache)
    prev = model.denoise(draws.prev[:1], cache)
    probs = mx.softmax(prev / draws.prev_temp[0], axis=-1)
    want = model.denoise(draws.x[:1], cache, self_conditioning_probs=probs)
    assert mx.allclose(logits[:1], want, atol=1e-4).item()

    def loss(m):
        ce, cert, enc, _ = certainty_terms(m, batch, draws, obj)
        return ce + 0.7 * cert + 0.3 * enc

    grads = dict(nn.utils.tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    # The first pass is under stop_gradient: differences must hold its conditioning fixed.
    held, embeddings = {}, model.self_conditioning_embeddings
    model.self_conditioning_embeddings = lambda probs: held.setdefault("soft", embeddings(probs))
    loss(model)
    for module, name in [
        (model.model.decoder.self_conditioning.up_proj, "self_conditioning.up_proj"),
        (model.model.decoder.layers[1].self_attn.q_proj, "layers.1.self_attn.q_proj"),
    ]:
        w, g = module.weight, grads[f"model.decoder.{name}.weight"]
        for idx in [(0, 0), (3, 5), (7, 1)]:
            out = []
            for sign in (1, -1):
                module.weight = w.at[idx].add(sign * 1e-2)
                out.append(loss(model).item())
            module.weight = w
            fd = (out[0] - out[1]) / 2e-2
            assert abs(fd - g[idx].item()) <= 2e-3 + 0.02 * abs(fd), (name, idx, fd, g[idx])


def test_step_batches_draw_within_max_steps_and_the_teacher_steps():
    model = random_tiny_model()
    C = model.args.canvas_length
    states = np.stack([np.full(C, s) for s in range(5)])[None]  # (1, 5, C): step s holds s
    run = T.Trajectory([2, 3], [4] * (C - 1) + [1], states, np.array([5]))
    obj = Certainty(max_steps=2)
    batches = StepBatches(model, CONFIG, obj)([run] * 64, 64, 512, loop=False)
    arrays = next(batches)
    draws = StepDraws(*arrays[-6:])
    s = np.array(draws.x[:, 0])
    assert set(s.tolist()) == {0, 1}  # steps 0 and 1 only (max_steps 2)
    assert (np.array(draws.has_prev) == (s > 0)).all()
    assert (np.array(draws.prev[:, 0]) == np.maximum(s - 1, 0)).all()
    temp = np.array(draws.temp)  # the sampler's schedule: t_max at a canvas's first step
    assert np.allclose(temp[s == 0], 0.8) and np.allclose(temp[s == 1], 0.4 + 0.4 * 3 / 4)
    with pytest.raises(ValueError, match="--max-steps must be at least 1"):
        Certainty(max_steps=0)


def _data(tmp_path, n=8):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Count {i}"} for i in range(n)]
    rows[1] = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]
    }
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.slow
def test_distill_command_end_to_end(tiny_checkpoint, tmp_path, capsys):
    from mlx_diffgemma import generate, load
    from mlx_diffgemma.distill import main
    from mlx_diffgemma.fuse import fuse

    data = _data(tmp_path)
    adapter = tmp_path / "student"
    argv = ["--model", str(tiny_checkpoint), "--data", str(data), "--adapter-path", str(adapter)]
    argv += ["--iters", "2", "--batch-size", "4", "--num-layers", "-1", "--max-steps", "2"]
    main(argv + ["--steps-per-report", "1"])
    out = capsys.readouterr().out
    assert "Teacher trajectories: 8/8 prompts." in out and "Iter 2: train loss" in out
    assert (adapter / "adapters.safetensors").is_file()
    model, tok = load(str(tiny_checkpoint), adapter_path=str(adapter))
    fused = fuse(str(tiny_checkpoint), str(adapter), str(tmp_path / "fused"))
    fused_model, _ = load(str(fused))
    kw = dict(max_tokens=8, seed=3)
    assert generate(model, tok, "Hi", **kw) == generate(fused_model, tok, "Hi", **kw)
    main(argv + ["--iters", "1"])  # a second run reuses the teacher's trajectories
    assert "Teacher trajectories:" not in capsys.readouterr().out


@pytest.mark.slow
def test_distill_bad_inputs_are_one_line(tiny_checkpoint, tmp_path):
    from conftest import save_checkpoint

    from mlx_diffgemma.distill import main

    data = _data(tmp_path)
    base = ["--model", str(tiny_checkpoint), "--adapter-path", str(tmp_path / "a")]
    base += ["--num-layers", "-1"]

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            main(base + list(argv))
        message = str(e.value.code)
        assert message.startswith("error: ") and "\n" not in message
        return message

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    assert "has no prompts" in error("--data", str(empty))
    assert "--max-steps must be at least 1 (got 0)" in error(
        "--data", str(data), "--max-steps", "0"
    )
    other = save_checkpoint(random_tiny_model(), tmp_path / "other")  # a 4,096-token vocabulary
    assert "vocab_size" in error("--data", str(data), "--teacher", str(other))
    wrong = tmp_path / "wrong.safetensors"
    mx.save_safetensors(str(wrong), {"model.decoder.layers.0.nothing": mx.zeros((2,))})
    assert "wrong.safetensors" in error("--data", str(data), "--resume-adapter-file", str(wrong))


def test_grown_student_computes_what_the_base_computes(tmp_path):
    """benchmarks/grow_depth.py: each copied layer passes the stream through (same encoder
    and decoder logits), and its zeroed output norms still get a gradient."""
    import importlib.util
    from pathlib import Path

    from conftest import save_checkpoint

    from mlx_diffgemma import load
    from mlx_diffgemma.tuner.forward import decoder_pass, encoder_pass

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grow_depth.py"
    spec = importlib.util.spec_from_file_location("grow_depth", path)
    grow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grow)
    base = save_checkpoint(random_tiny_model(), tmp_path / "base")
    grow.grow(base, tmp_path / "deep", 3)
    (a, _), (b, _) = load(str(base)), load(str(tmp_path / "deep"))
    assert len(b.model.decoder.layers) == 3 * len(a.model.decoder.layers)
    assert b.args.layer_types[:3] == [a.args.layer_types[0]] * 3
    tokens, x = mx.array([[2, 5, 9, 4, 7, 3]]), mx.array([[8, 6, 1, 9, 3, 3, 5, 2]])
    start = mx.array([2])
    outs = []
    for m in (a, b):
        kvs, enc = encoder_pass(m, tokens)
        outs.append((enc, decoder_pass(m, x, start, kvs, None)))
    for u, v in zip(*outs):
        assert mx.allclose(u, v, atol=1e-5, rtol=1e-5).item()

    def loss(m):
        kvs, _ = encoder_pass(m, tokens)
        return decoder_pass(m, x, start, kvs, None).square().mean()

    grads = nn.value_and_grad(b, loss)(b)[1]
    norm = grads["model"]["decoder"]["layers"][1]["post_attention_layernorm"]["weight"]
    assert mx.abs(norm).max().item() > 0
    with pytest.raises(ValueError, match="--factor must be at least 2"):
        grow.grow(base, tmp_path / "same", 1)
