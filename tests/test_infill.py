"""Infill and clamped canvases: hole syntax, layouts, clamps that hold, the CLI.

The tiny checkpoint has canvas_length 8, so most layouts here span several canvases.
"""

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_diffgemma import (
    CanvasLayout,
    InfillTemplate,
    infill,
    stream_generate,
    stream_infill,
)
from mlx_diffgemma.cli import cli
from mlx_diffgemma.diffusion.steps import Block, DenoiseStep, generate_step
from mlx_diffgemma.model import Model
from mlx_diffgemma.tasks.infill import Hole

CODE = "def add(a, b):\n[[hole:6]]\n\nprint(add(1, 2))"


def test_parse_splits_prefix_fixed_text_holes_and_edits(tok):
    t = InfillTemplate.parse(
        tok, "A [[hole]] B [[hole:3]][[edit]]old words[[/edit]] C [[edit:9]]x[[/edit]]", 5
    )
    assert t.prefix == "A "
    kinds = [(type(p).__name__, p if isinstance(p, str) else (p.budget, p.seed)) for p in t.parts]
    n_old = len(tok.encode("old words"))
    assert kinds == [
        ("Hole", (5, "")),
        ("str", " B "),
        ("Hole", (3, "")),
        ("Hole", (n_old, "old words")),
        ("str", " C "),
        ("Hole", (9, "x")),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("no markup here", "has no [[hole]]"),
        ("a [[hole:0]] b", "budget of 0 tokens"),
        ("a [[hole:x]] b", "Malformed markup '[[hole:x]]' at character 2"),
        ("a [[edit]]x b", "[[edit]] at character 2 is not closed"),
        ("a [[/edit]] [[hole]]", "[[/edit]] at character 2 closes no [[edit]]"),
        ("[[edit]]a [[hole]] b[[/edit]]", "cannot nest"),
        ("a [[edit:1]]three words here[[/edit]]", "more than its budget of 1"),
    ],
)
def test_parse_errors_name_the_problem(tok, text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        InfillTemplate.parse(tok, text)


def test_fixed_text_must_survive_tokenization(tok):
    class Lossy:  # a tokenizer whose decode loses case
        pad_token_id, eos_token_ids = 0, [1]

        def encode(self, s):
            return tok.encode(s)

        def decode(self, ids):
            return tok.decode(ids).lower()

    with pytest.raises(ValueError, match="cannot be kept byte for byte"):
        InfillTemplate(Lossy(), "", [Hole(2), "Kept Text"])


def test_fixed_text_decodes_byte_identically(tok):
    texts = ["\n\nprint(add(1, 2))", '", "age": ', " | x |\n|", "  indented\tcode\r\n", "é😀 ü"]
    for s in texts:
        t = InfillTemplate(tok, "", [Hole(1), s])
        assert tok.decode(t.part_ids[1]) == s


def test_layout_clamps_text_frees_holes_seeds_edits_and_ends_the_text(tok):
    t = InfillTemplate.parse(tok, "P[[hole:3]] mid [[edit:4]]two[[/edit]]!")
    mid, two, bang = tok.encode(" mid "), tok.encode("two"), tok.encode("!")
    lay = t.layout(8, 106, 262144)
    n = 3 + len(mid) + 4 + len(bang)
    assert len(lay) == 16  # two canvases of 8; the text ends inside the second
    F, T = (False,), (True,)
    assert lay.fixed == F * 3 + T * len(mid) + F * 4 + T * (16 - n + len(bang))
    seeded_at = 3 + len(mid)
    assert lay.seeded == F * seeded_at + T * len(two) + F * (16 - seeded_at - len(two))
    assert list(lay.ids[3 : 3 + len(mid)]) == mid
    assert list(lay.ids[3 + len(mid) : 3 + len(mid) + len(two)]) == two
    assert list(lay.ids[n - len(bang) :]) == bang + [106] + [0] * (16 - n - 1)
    assert t.prompt_ids() == [tok.bos_token_id] + tok.encode("P")


def test_layout_stops_at_the_last_canvas_with_a_hole(tok):
    t = InfillTemplate.parse(tok, CODE)
    lay = t.layout(8, 1, 262144)
    assert len(lay) == 8 and not any(lay.fixed[:6]) and all(lay.fixed[6:])
    # The fixed tail after the last generated canvas comes back from `complete` as is.
    text, fills = t.complete(list(lay.ids[:6]) + list(lay.ids[6:]))
    assert text.endswith("\n\nprint(add(1, 2))")


def test_complete_ends_a_fill_at_pad_or_eos_and_checks_the_frame(tok):
    t = InfillTemplate(tok, "x", [Hole(4), "!", Hole(3)])
    (hi,), bang = tok.encode(" hi"), tok.encode("!")
    # pad (0) ends the first fill, <turn|> (106, an EOS id) the second
    assert t.complete([hi, 0, hi, hi] + bang + [hi, 106, hi]) == ("x hi! hi", (" hi", " hi"))
    with pytest.raises(ValueError, match="do not hold the fixed text '!' at position 4"):
        t.complete([hi] * 7)


def _blocks(layout, C):
    return [
        (layout.fixed[b * C : (b + 1) * C], layout.ids[b * C : (b + 1) * C])
        for b in range(len(layout) // C)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("steps", [1, 3])
def test_clamped_positions_hold_at_every_step_and_in_the_output(tiny, seed, steps):
    model, tok = tiny
    C = model.args.canvas_length
    t = InfillTemplate.parse(tok, "x = [[hole:5]] + compute(y)\n[[hole:10]]\nreturn x")
    layout = t.layout(C, 1, model.args.vocab_size)
    assert len(layout) > C  # several canvases
    drafts, ids = [], []
    for r in stream_infill(model, tok, t, seed=seed, drafts=True, max_denoising_steps=steps):
        if r.kind == "draft":
            drafts.append(r)
        else:
            ids += r.token_ids
    blocks = _blocks(layout, C)
    assert len(drafts) == steps * len(blocks)
    for d in drafts:
        fixed, want = blocks[d.block_index]
        got = [g for g, f in zip(d.draft_tokens, fixed) if f]
        assert got == [w for w, f in zip(want, fixed) if f], (d.block_index, d.step)
        assert all(a for a, f in zip(d.draft_accepted, fixed) if f)
    fixed = [i for i, f in zip(layout.ids, layout.fixed) if f]
    assert [i for i, f in zip(ids, layout.fixed) if f] == fixed
    text, fills = t.complete(ids)
    assert text == f"x = {fills[0]} + compute(y)\n{fills[1]}\nreturn x"


def test_renoise_never_touches_clamped_positions(tiny):
    model, _ = tiny
    C = model.args.canvas_length
    fixed = (True, False, False, True, False, True, False, False)
    layout = CanvasLayout((11, 0, 0, 22, 0, 33, 0, 0), fixed)  # the second canvas is free
    config = model.generation_config.replace(max_new_tokens=2 * C, max_denoising_steps=4)
    for seed in range(3):
        events = generate_step(
            mx.array([[2, 9, 10]]),
            model,
            config=config,
            key=mx.random.key(seed),
            layout=layout,
            drafts=True,
        )
        first = [e for e in events if isinstance(e, DenoiseStep) and e.block == 0]
        assert len(first) == 4
        for e in first:  # the canvas after renoise is the next step's input
            assert [e.canvas[0, i].item() for i in (0, 3, 5)] == [11, 22, 33]


def test_no_layout_and_an_empty_layout_follow_the_reference_loop(tiny):
    """Without clamps, stream_generate == generate_step token for token (same seed)."""
    model, tok = tiny
    prompt = [tok.bos_token_id] + tok.encode("Once upon a time")
    config = model.generation_config.replace(
        max_new_tokens=24, max_denoising_steps=3, eos_token_id=()
    )
    ref = [
        e.tokens[0].tolist()
        for e in generate_step(mx.array([prompt]), model, config=config, key=mx.random.key(7))
        if isinstance(e, Block)
    ]
    ref = sum(ref, [])
    for layout in (None, CanvasLayout((0,) * 24, (False,) * 24)):
        out = []
        for r in stream_generate(model, tok, prompt, config=config, seed=7, layout=layout):
            out += r.token_ids
        assert out == ref


def test_edit_regions_start_from_the_old_text(tiny, monkeypatch):
    model, tok = tiny
    seen = []
    original = Model.denoise

    def spy(self, canvas, cache, **kw):
        seen.append(canvas[0].tolist())
        return original(self, canvas, cache, **kw)

    monkeypatch.setattr(Model, "denoise", spy)
    t = InfillTemplate.parse(tok, "Say [[edit:6]]hello world[[/edit]] now")
    r = infill(model, tok, t, seed=0, max_denoising_steps=1)
    old = tok.encode("hello world")
    assert seen[0][: len(old)] == old  # the first forward sees the old text
    assert r.text == f"Say {r.fills[0]} now"


def test_a_hole_larger_than_a_canvas_spans_canvases(tiny):
    model, tok = tiny
    C = model.args.canvas_length
    r = infill(model, tok, "Start:[[hole:20]] -- end of the text.", seed=1, max_denoising_steps=2)
    # 20 slots: 3 canvases; the fixed text after the 24th position is not generated.
    assert C < 20 and r.response.canvases == 3
    assert r.text == f"Start:{r.fills[0]} -- end of the text."


def test_layout_too_long_for_the_context_is_an_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="more than the model's context of 512"):
        infill(model, tok, "a [[hole:600]] b", seed=0)


def test_chat_messages_come_before_the_prefix(tiny):
    model, tok = tiny
    messages = [{"role": "user", "content": "Complete it."}]
    t = InfillTemplate.parse(tok, "Answer: [[hole:2]].")
    assert t.prompt_ids(messages) == tok.apply_chat_template(messages) + tok.encode("Answer: ")
    assert t.end_id(chat=True) == 106 and t.end_id(chat=False) == 1
    r = infill(model, tok, t, messages=messages, seed=0)
    assert r.text.startswith("Answer: ") and r.text.endswith(".")


def run_cli(checkpoint, *args, input=None):
    return CliRunner().invoke(cli, ["infill", "--model", str(checkpoint), *args], input=input)


def test_cli_prints_the_completed_text(tiny_checkpoint, tmp_path):
    result = run_cli(tiny_checkpoint, "-t", CODE, "--seed", "0", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("def add(a, b):\n")
    assert result.stdout.endswith("\n\nprint(add(1, 2))\n")
    path = tmp_path / "in.txt"
    path.write_text("The [[hole:2]] sat on the [[edit]]mat[[/edit]].")
    result = run_cli(tiny_checkpoint, "-f", str(path), "--fills", "-i", "Fix it.", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert [type(json.loads(line)) for line in result.stdout.splitlines()] == [str, str]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Give the text with --text (- for stdin) or --file."),
        (["-t", "no holes"], "The text has no [[hole]]"),
        (["-t", "a [[hole]]", "--steps", "0"], "Invalid value for '--steps'"),
        (["-t", "a [[hole:900]]"], "more than the model's context"),
    ],
)
def test_cli_errors_are_one_line(tiny_checkpoint, args, message):
    result = run_cli(tiny_checkpoint, *args)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert message in result.stderr.strip().splitlines()[-1]
