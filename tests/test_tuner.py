"""Fine-tuning: dense experts, canvas alignment, training a toy, adapters (mlx-lm, PEFT), fuse, CLI."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.tuner.lora import LoRASwitchLinear
from mlx_lm.tuner.trainer import TrainingArgs

from mlx_diffgemma import generate, load, load_model
from mlx_diffgemma.tuner import toy
from mlx_diffgemma.tuner.adapters import setup_full
from mlx_diffgemma.tuner.data import Example, make_batch
from mlx_diffgemma.tuner.forward import decoder_pass, encoder_pass
from mlx_diffgemma.tuner.init import init_model
from mlx_diffgemma.tuner.losses import Objective
from mlx_diffgemma.tuner.trainer import ProgressReport, make_optimizer, train

# Subprocess servers, CLIs or training: the full suite only (README: two tiers).
pytestmark = pytest.mark.slow

ALPHABET = "0123456789|"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}|{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A character tokenizer (digits and '|'), a chat template that writes `<bos>digits|`."""
    d = tmp_path_factory.mktemp("toy_tok")
    toy.build_char_tokenizer(d, ALPHABET)
    toy.write_generation_config(d, max_new_tokens=8, max_denoising_steps=8)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from mlx_diffgemma.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tok_dir)


def small_config(**kw):
    return toy.tiny_config(toy.vocab_of(ALPHABET), 8, **kw)


def test_dense_experts_match_sorted_path():
    model = init_model(small_config(hidden_size=64), seed=1)
    x = mx.random.normal((40, 64), key=mx.random.key(0))
    layer = model.layers[0]
    inds, weights = layer.router(x)
    lora = LoRASwitchLinear.from_base(layer.experts.gate_up_proj, r=4)
    lora.lora_b = mx.random.normal(lora.lora_b.shape, key=mx.random.key(1)) * 0.1
    quant = QuantizedSwitchLinear(64, 64, 4, bias=False, group_size=32, bits=4)
    variants = {"float": {}, "lora": {"gate_up_proj": lora}, "4-bit": {"down_proj": quant}}
    for name, modules in variants.items():
        experts = layer.experts
        experts.update_modules(modules)
        experts.dense = True
        dense = experts(x, inds, weights)
        experts.dense = False
        sorted_ = experts(x, inds, weights)
        experts.dense = None
        err = float(mx.abs(dense - sorted_).max())
        assert err <= 1e-5 * float(mx.abs(sorted_).max()), f"{name}: {err}"


def test_training_canvas_sees_what_the_sampler_caches():
    """Canvas k of an answer: the same logits as the sampler's cache after the prompt and
    canvases 0..k-1 (sliding window 4 < the prompt)."""
    model = init_model(small_config(sliding_window=4), seed=2)
    rng = np.random.default_rng(0)
    C = 8
    examples = [
        Example([2] + list(rng.integers(4, 15, n)), list(rng.integers(4, 15, 12)), 1)
        for n in (6, 9)
    ]
    batch = make_batch(examples, C, pad_id=0)
    kvs, _ = encoder_pass(model, batch.tokens)
    start = batch.prompt_len + C  # canvas 1
    canvas = mx.array(rng.integers(0, 16, (2, C)).astype(np.int32))
    logits = decoder_pass(model, canvas, start, kvs)
    for b in range(2):
        cache = model.make_cache()
        model.encode(batch.tokens[b : b + 1, : int(start[b])], cache)
        ref = model.denoise(canvas[b : b + 1], cache)
        assert float(mx.abs(logits[b : b + 1] - ref).max()) < 1e-4


def shift_examples(tokenizer, n, seed, digits=4):
    """Prompt `<bos>d1..dn|`, answer every digit plus one (mod 10)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = "".join(str(d) for d in rng.integers(0, 10, digits))
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(s + "|")
        answer = "".join(str((int(c) + 1) % 10) for c in s)
        out.append(Example(prompt, tokenizer.encode(answer), 1))
    return out


@pytest.fixture(scope="module")
def trained(tok_dir, tokenizer, tmp_path_factory):
    """A toy trained from scratch to shift 4 digits; saved as a checkpoint folder."""
    config = small_config(hidden_size=64, num_hidden_layers=1)
    model = init_model(config, seed=0)
    setup_full(model, -1)
    out = tmp_path_factory.mktemp("toy_trained")
    args = TrainingArgs(
        batch_size=16,
        iters=TRAIN_ITERS,
        val_batches=0,
        steps_per_report=100,
        steps_per_eval=10**6,
        steps_per_save=10**6,
        adapter_file=out / "adapters.safetensors",
    )
    report = ProgressReport(print_fn=lambda *a, **k: None)
    train(
        model,
        shift_examples(tokenizer, 2000, 0),
        [],
        args,
        Objective(),
        make_optimizer(1e-2, TRAIN_ITERS),
        pad_id=0,
        seed=0,
        callback=report,
        pad_to=8,
    )
    folder = toy.save_model(model, config, out / "model", tok_dir / "tokenizer.model")
    for name in ("generation_config.json", "chat_template.jinja"):
        (folder / name).write_text((tok_dir / name).read_text())
    return folder, report.history


TRAIN_ITERS = 300
TARGET_ACCURACY = 0.9  # exact answers on 40 unseen 4-digit strings (measured: 40/40)


def test_training_from_scratch_reaches_accuracy(trained):
    folder, history = trained
    model, tokenizer = load(folder)
    tests = shift_examples(tokenizer, 40, seed=99)
    hits = sum(
        generate(model, tokenizer, e.prompt, seed=i) == tokenizer.decode(e.answer)
        for i, e in enumerate(tests)
    )
    print(
        f"\n[toy] shift 4 digits after {TRAIN_ITERS} steps: exact {hits}/40; "
        f"loss {history[0]['train_loss']:.3f} -> {history[-1]['train_loss']:.3f}"
    )
    assert hits / len(tests) >= TARGET_ACCURACY


def _logits(model, prompt, canvas):
    cache = model.make_cache()
    model.encode(mx.array([prompt]), cache)
    return model.denoise(mx.array([canvas]), cache)


def test_lora_cli_adapter_reload_and_fuse(trained, tmp_path):
    from mlx_diffgemma import fuse, lora

    base, _ = trained
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for _ in range(64):  # a related task: sort the digits
        s = "".join(str(d) for d in rng.integers(0, 10, 4))
        rows.append(json.dumps({"prompt": s, "completion": "".join(sorted(s))}))
    for name in ("train", "valid", "test"):
        (data / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    adapters = tmp_path / "adapters"
    (tmp_path / "lora.yaml").write_text(
        "lora_parameters:\n  rank: 4\n  scale: 10.0\n  dropout: 0.0\nseed: 3\n"
    )
    lora.main(
        [
            "--model",
            str(base),
            "--train",
            "--data",
            str(data),
            "--iters",
            "12",
            "--config",
            str(tmp_path / "lora.yaml"),
            "--batch-size",
            "8",
            "--num-layers",
            "-1",
            "--val-batches",
            "1",
            "--steps-per-eval",
            "6",
            "--adapter-path",
            str(adapters),
            "--learning-rate",
            "1e-2",
            "--test",
            "--test-batches",
            "1",
        ]
    )
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4
    assert config["lora_parameters"]["scale"] == 10.0 and config["seed"] == 3
    keys = set(mx.load(str(adapters / "adapters.safetensors")))
    assert any(".experts.gate_up_proj.lora_a" in k for k in keys)
    assert any(".router.proj.lora_b" in k for k in keys)
    assert "model.decoder.self_conditioning.down_proj.lora_b" in keys

    prompt, canvas = [2, 5, 6, 7, 8, 15], [9, 4, 6, 1, 0, 0, 3, 5]
    plain = _logits(load_model(base), prompt, canvas)
    adapted = _logits(load_model(base, adapter_path=str(adapters)), prompt, canvas)
    assert float(mx.abs(adapted - plain).max()) > 1e-3  # the adapter does something
    fused = fuse.fuse(base, adapters, tmp_path / "fused")
    got = _logits(load_model(fused), prompt, canvas)
    err = float(mx.abs(got - adapted).max())
    print(f"\n[lora] fused vs base+adapter: max|dlogit| {err:.1e}")
    assert err < 1e-4

    # mlx-lm's own loader reads the same adapter onto the same model.
    from mlx_lm.tuner.utils import load_adapters

    model = load_model(base)
    load_adapters(model, str(adapters))
    assert float(mx.abs(_logits(model, prompt, canvas) - adapted).max()) == 0.0

    # The generate command applies it as `load(..., adapter_path=)` does.
    from click.testing import CliRunner

    from mlx_diffgemma import generate, load
    from mlx_diffgemma.cli import cli

    args = ["generate", "--model", str(base), "-p", "4213", "--seed", "0", "-m", "8"]
    kw = dict(seed=0, max_tokens=8, enable_thinking=False)
    messages = [{"role": "user", "content": "4213"}]
    for adapter in (None, str(adapters)):
        extra = ["--adapter-path", adapter] if adapter else []
        result = CliRunner().invoke(cli, args + extra)
        assert result.exit_code == 0, result.output
        model, tok = load(base, adapter_path=adapter)
        assert result.stdout == generate(model, tok, messages, **kw) + "\n"


def test_lora_cli_errors(tmp_path, capsys):
    from mlx_diffgemma import lora

    with pytest.raises(SystemExit) as e:
        lora.main(["--model", str(tmp_path / "missing"), "--train", "--data", str(tmp_path)])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        lora.main(
            [
                "--model",
                str(tmp_path),
                "--init-config",
                str(tmp_path / "c.json"),
                "--fine-tune-type",
                "lora",
                "--train",
                "--data",
                str(tmp_path),
            ]
        )
    assert "--fine-tune-type full" in str(e.value)


def test_from_scratch_cli_and_fuse(tok_dir, tmp_path):
    from mlx_diffgemma import fuse, lora

    (tmp_path / "tiny.json").write_text(json.dumps(small_config(hidden_size=32)))
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "\n".join(json.dumps({"text": f"{i:04d}"}) for i in range(16)) + "\n"
    )
    adapters = tmp_path / "run"
    lora.main(
        [
            "--model",
            str(tok_dir),
            "--init-config",
            str(tmp_path / "tiny.json"),
            "--fine-tune-type",
            "full",
            "--num-layers",
            "-1",
            "--train",
            "--data",
            str(data),
            "--iters",
            "3",
            "--batch-size",
            "4",
            "--adapter-path",
            str(adapters),
        ]
    )
    weights = mx.load(str(adapters / "adapters.safetensors"))
    assert "model.decoder.embed_tokens.weight" in weights
    fused = fuse.fuse(tok_dir, adapters, tmp_path / "model")
    model = load_model(fused)
    params = dict(tree_flatten(model.parameters()))
    for k, v in weights.items():
        assert mx.array_equal(params[k], v), k


def test_sudoku_6x6_layout_and_ar_baseline(tokenizer):
    from mlx_diffgemma.tasks import sudoku as S
    from mlx_diffgemma.tuner.ar import ar_generate

    puzzle = "460200500004120306340520604102013065"
    solution = "461253532614125346346521654132213465"
    assert S.hardness(puzzle) == "easy" and S.answer_tokens(36) == 71
    assert S.answer_tokens(36, spaced=False) == 36 and not S.spaced_answer("toy")
    assert S.score(" ".join(solution), puzzle, solution) == S.Score(1.0, 15 / 36, 1.0, 1.0, 1.0)
    assert S.score(solution, puzzle, solution).exact == 1.0
    assert S.prompt_ids(tokenizer, puzzle, "toy") == [2] + tokenizer.encode(puzzle + "|")
    spaced = S.answer_layout(tokenizer, puzzle, 72, 16, 1, digits_only=True)
    assert len(spaced.ids) == 72 and tokenizer.decode(spaced.ids[:71]) == " ".join(puzzle)
    lay = S.answer_layout(tokenizer, puzzle, 40, 16, 1, digits_only=True, spaced=False)
    assert len(lay.ids) == 40 and sum(not f for f in lay.fixed) == 15
    assert tokenizer.decode(lay.ids[:36]) == puzzle and lay.ids[36] == 1
    allowed = np.nonzero(np.array(lay.token_masks[0]))[0].tolist()
    assert tokenizer.decode(allowed) == "123456"
    model = init_model(small_config(), seed=3)
    fixed = [i if f else None for i, f in zip(lay.ids, lay.fixed)]
    out = ar_generate(
        model,
        S.prompt_ids(tokenizer, puzzle, "toy"),
        37,
        (1,),
        fixed,
        [None if f else allowed for f in lay.fixed],
    )
    text = tokenizer.decode(out[:36])
    assert [text[i] for i in range(36) if puzzle[i] != "0"] == [c for c in puzzle if c != "0"]
    assert all(c in "123456" for c in text) and out[36] == 1


def test_dense_experts_chosen_for_wide_few_experts_on_cpu():
    from mlx_diffgemma.dense_experts import use_dense

    with mx.stream(mx.cpu):
        wide = init_model(small_config(hidden_size=512, num_hidden_layers=1), seed=0)
        narrow = init_model(small_config(hidden_size=64, num_hidden_layers=1), seed=0)
        assert use_dense(wide.layers[0].experts, 2)
        assert not use_dense(narrow.layers[0].experts, 2)
        many = init_model(small_config(hidden_size=512, num_hidden_layers=1, num_experts=12))
        assert not use_dense(many.layers[0].experts, 2)  # 12 experts > 4 x top-2


def test_shipped_sudoku_toy_solves_offline():
    from pathlib import Path

    from mlx_diffgemma.tasks import sudoku as S

    folder = Path(__file__).resolve().parents[1] / "examples" / "sudoku_toy"
    model, tokenizer = load(folder)

    def solved(steps):
        scores = []
        for i, (puzzle, solution) in enumerate(S.load_puzzles(folder / "test.csv", limit=10)):
            text, last = S.solve(
                model,
                tokenizer,
                puzzle,
                style="toy",
                digits_only=True,
                seed=i,
                max_denoising_steps=steps,
            )
            assert last.finish_reason == "stop"
            scores.append(S.score(text, puzzle, solution))
        assert all(s.givens_exact == 1.0 for s in scores)
        return sum(s.exact for s in scores), sum(s.blank for s in scores) / len(scores)

    # docs/FINE_TUNING.md's table on these 10 unseen puzzles: 9 solved at 16 steps (blanks 0.96).
    exact16, blank16 = solved(16)
    assert exact16 >= 7 and blank16 >= 0.85
    assert solved(1)[0] < exact16  # accuracy rises with denoising steps
