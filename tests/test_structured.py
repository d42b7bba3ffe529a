"""Allowed-token masks in the sampler and the loop; JSON and table skeletons on a clamped canvas."""

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import (
    CanvasLayout,
    generate_skeleton,
    generate_table,
    json_template,
    spec_from_json_schema,
    table_template,
    validate_json,
    validate_table,
)
from mlx_diffgemma.diffusion import sampler as S
from mlx_diffgemma.diffusion.config import DiffusionConfig
from mlx_diffgemma.diffusion.steps import Block, DenoiseStep, generate_step
from mlx_diffgemma.tasks.structured import token_class

SPEC = {
    "name": "string:6",
    "ok": "boolean",
    "tags": ["string:3", "boolean"],
    "address": {"city": "string:4", "zip": "string:2"},
}


# --- the sampler math ------------------------------------------------------------------


def test_masked_stats_are_those_of_the_renormalised_distribution():
    logits = mx.array([[[2.0, 1.0, 0.5, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]]])
    allowed = mx.array([[[True, True, False, True, False], [False, False, True, False, False]]])
    temp = mx.array(0.5)
    probs, ent, argmax = S.step_stats(logits, temp, allowed=allowed)
    x = np.array([2.0, 1.0, -1.0]) / 0.5
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(np.array(probs[0, 0]), [p[0], p[1], 0, p[2], 0], rtol=1e-6)
    np.testing.assert_allclose(ent[0, 0].item(), -(p * np.log(p)).sum(), rtol=1e-5)
    # a single allowed token: probability 1, entropy 0 (not nan), and it is the argmax
    assert probs[0, 1].tolist() == [0, 0, 1, 0, 0] and ent[0, 1].item() == 0.0
    assert argmax.tolist() == [[0, 2]]  # the unmasked argmax (4) is disallowed


def test_an_all_allowed_mask_changes_nothing():
    logits = mx.random.normal((2, 6, 300), key=mx.random.key(0)) * 4
    temp = S.temperature(3, 4, 0.4, 0.8)
    plain = S.step_stats(logits, temp)
    masked = S.step_stats(logits, temp, allowed=mx.ones(logits.shape, dtype=mx.bool_))
    for a, b in zip(plain, masked):
        assert mx.array_equal(a, b).item()


class Uniform:
    """A model whose logits are flat: every free position has entropy ln V."""

    def __init__(self, vocab=50, canvas=8):
        self.args = SimpleNamespace(
            vocab_size=vocab, canvas_length=canvas, final_logit_softcapping=None
        )

    def make_cache(self):
        return [SimpleNamespace(offset=0, state=mx.array(0))]

    def encode(self, ids, cache):
        pass

    def denoise(self, canvas, cache, **kw):
        return mx.zeros((*canvas.shape, self.args.vocab_size))


def test_masked_entropy_drives_acceptance_and_the_output_stays_allowed():
    model = Uniform()
    V, C = model.args.vocab_size, model.args.canvas_length
    masks = mx.array([[True] * V, [i == 7 for i in range(V)], [i in (3, 4) for i in range(V)]])
    classes = (0, 1, 0, 1, 2, 2, 0, 0)
    config = DiffusionConfig(max_new_tokens=C, max_denoising_steps=4, stability_threshold=0)
    for seed in range(3):
        events = list(
            generate_step(
                mx.array([[2]]),
                model,
                config=config,
                key=mx.random.key(seed),
                drafts=True,
                layout=CanvasLayout((0,) * C, (False,) * C, (), classes, masks),
            )
        )
        for e in [e for e in events if isinstance(e, DenoiseStep)]:
            acc = e.accepted[0].tolist()
            # one-token positions cost no entropy and are always accepted; the bound
            # (0.1 nats) still admits exactly one ln V position and no ln 2 ones on top
            assert acc[1] and acc[3]
            assert sum(acc) == 3, acc
            assert e.argmax[0, 1].item() == e.argmax[0, 3].item() == 7
            assert e.argmax[0, 4].item() in (3, 4) and e.argmax[0, 5].item() in (3, 4)
        block = events[-1]
        assert isinstance(block, Block)
        assert block.tokens[0, 1].item() == 7 and block.tokens[0, 4].item() in (3, 4)


def test_token_classes_need_token_masks_that_fit_the_model():
    model = Uniform()
    config = DiffusionConfig(max_new_tokens=8, max_denoising_steps=1)
    with pytest.raises(ValueError, match="token_class needs token_masks"):
        CanvasLayout((0,) * 8, (False,) * 8, (), (0,) * 8)
    with pytest.raises(ValueError, match="token_class 1 is out of range for 1 token_masks rows"):
        CanvasLayout((0,) * 8, (False,) * 8, (), (1,) * 8, mx.ones((1, 50), mx.bool_))
    layout = CanvasLayout((0,) * 8, (False,) * 8, (), (0,) * 8, mx.ones((1, 49), mx.bool_))
    with pytest.raises(
        ValueError, match="token_masks has 49 columns; the model's vocab_size is 50"
    ):
        list(
            generate_step(
                mx.array([[2]]), model, config=config, key=mx.random.key(0), layout=layout
            )
        )


def test_all_allowed_masked_path_matches_transformers(tmp_path_factory):
    """A no-clamp run through the masked code path reproduces transformers exactly."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers.models.diffusion_gemma")
    from hf_reference import run_scenario
    from test_parity_hf import ReplayDraws

    from mlx_diffgemma import load_model

    scenario = run_scenario("eos_run", tmp_path_factory.mktemp("masked_parity"))
    trace = scenario["trace"]
    model = load_model(scenario["path"])
    config = model.generation_config.replace(**scenario["generate_kwargs"])
    V, n = model.args.vocab_size, config.max_new_tokens
    events = list(
        generate_step(
            mx.array(scenario["input_ids"]),
            model,
            config=config,
            draws=ReplayDraws(trace["draws"]),
            drafts=True,
            layout=CanvasLayout((0,) * n, (False,) * n, (), (0,) * n, mx.ones((1, V), mx.bool_)),
        )
    )
    steps = [e for e in events if isinstance(e, DenoiseStep)]
    ref_steps = [s for c in trace["canvases"] for s in c["steps"]]
    assert len(steps) == len(ref_steps)
    for i, (s, r) in enumerate(zip(steps, ref_steps)):
        assert np.array_equal(np.array(s.accepted), r["accepted_mask"]), f"accept mask, step {i}"
        assert np.array_equal(np.array(s.canvas), r["canvas_out"]), f"canvas, step {i}"
    out = [np.array(e.tokens) for e in events if isinstance(e, Block)]
    sequence = np.concatenate([scenario["input_ids"]] + out, -1)
    assert np.array_equal(sequence, trace["sequences"])


# --- token classes -----------------------------------------------------------------------


def test_token_classes_keep_values_inside_their_frame(tok):
    texts = {i: tok.decode([i]) for i in range(tok.vocab_size)}
    string = token_class(tok, "string")
    assert string[tok.pad_token_id]  # the filler
    for i in np.flatnonzero(string):
        t = texts[int(i)]
        if i != tok.pad_token_id:
            assert '"' not in t and "\\" not in t and all(ord(c) >= 0x20 for c in t), (i, t)
    for bad in ('"', '",', "\\", "\n", "<turn|>", "<unused0>"):
        for i in tok.encode(bad):
            assert not string[i], bad
    assert not any(string[i] for i in [tok.bos_token_id, *tok.eos_token_ids])
    assert sorted(texts[int(i)] for i in np.flatnonzero(token_class(tok, "digit"))) == list(
        "0123456789"
    )
    assert {texts[int(i)] for i in np.flatnonzero(token_class(tok, "space_true_false"))} == {
        " true",
        " false",
    }
    cell = token_class(tok, "cell")
    assert not any(cell[i] for i in tok.encode("|")) and not cell[tok.encode("\n")[0]]
    with pytest.raises(ValueError, match="Unknown token class 'hex'"):
        token_class(tok, "hex")


# --- JSON ----------------------------------------------------------------------------------


def frame_of(spec, fills):
    """The JSON text the skeleton gives for these fills (strings quoted, others as is)."""
    it = iter(fills)

    def emit(s):
        if isinstance(s, dict):
            return "{" + ", ".join(f"{json.dumps(k)}: {emit(v)}" for k, v in s.items()) + "}"
        if isinstance(s, list):
            return "[" + ", ".join(emit(v) for v in s) + "]"
        f = next(it)
        return f'"{f}"' if s.startswith("string") else f.lstrip() if s == "boolean" else f

    return emit(spec)


def test_json_template_clamps_the_frame(tok):
    t = json_template(tok, {"name": "string:5", "age": "integer:3", "ok": "boolean"})
    assert t.prefix == '{"name": "'
    assert [p if isinstance(p, str) else p.budget for p in t.parts] == [
        5,
        '", "age": ',
        3,
        ', "ok":',
        1,
        "}",
    ]
    ok = t.parts[4]
    assert ok.first is ok.rest is token_class(tok, "space_true_false")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generate_skeleton_frame_holds_and_parses_on_a_random_model(tiny, seed):
    model, tok = tiny
    r = generate_skeleton(model, tok, SPEC, seed=seed, max_denoising_steps=2)
    assert r.ok, (r.problems, r.text)
    assert r.text == frame_of(SPEC, r.fills)
    assert set(r.value) == set(SPEC) and isinstance(r.value["tags"][1], bool)
    assert r.value["address"]["city"] == r.fills[4]


def test_integer_holes_hold_digits_only(tiny):
    model, tok = tiny
    spec = {"n": "integer:4", "x": "number:4"}
    for seed in range(3):
        r = generate_skeleton(model, tok, spec, seed=seed, max_denoising_steps=2)
        n, x = r.fills
        assert n and all(c in "-0123456789" for c in n) and "-" not in n[1:]
        assert x and all(c in "-.0123456789" for c in x)
        assert r.text == f'{{"n": {n}, "x": {x}}}'


def test_validate_json_reports_each_problem():
    spec = {"a": "integer", "b": ["string", "boolean"], "c": {"d": "number"}}
    assert validate_json('{"a": 3, "b": ["x", true], "c": {"d": 1.5}}', spec) == (
        {"a": 3, "b": ["x", True], "c": {"d": 1.5}},
        [],
    )
    value, problems = validate_json('{"a": 07}', spec)
    assert value is None and problems[0].startswith("not valid JSON")
    _, problems = validate_json('{"a": true, "b": ["x"], "c": {}, "e": 1}', spec)
    assert problems == [
        "$.a: expected integer, got true",
        "$.b: expected an array of 2 items",
        "$.c: missing key 'd'",
        "$: unexpected key 'e'",
    ]


def test_spec_errors_name_the_field(tok):
    with pytest.raises(ValueError, match="Unknown field type 'date'"):
        json_template(tok, {"when": "date"})
    with pytest.raises(ValueError, match="a boolean is one token"):
        json_template(tok, {"ok": "boolean:3"})
    with pytest.raises(ValueError, match="has no keys"):
        json_template(tok, {"a": {}})


def test_spec_from_json_schema():
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "bio": {"type": "string", "x-max-tokens": 40},
            "age": {"type": "integer"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
        },
    }
    assert spec_from_json_schema(schema) == {
        "name": "string:10",
        "bio": "string:40",
        "age": "integer",
        "ok": "boolean",
        "tags": ["string:16", "string:16"],
    }
    with pytest.raises(ValueError, match=r"\$.tags: an array needs 'items' and a fixed length"):
        spec_from_json_schema({"type": "object", "properties": {"tags": {"type": "array"}}})
    with pytest.raises(ValueError, match=r"\$.k: 'enum' is not supported"):
        spec_from_json_schema(
            {"type": "object", "properties": {"k": {"type": "string", "enum": ["a"]}}}
        )


# --- tables ---------------------------------------------------------------------------------


def test_table_frame_holds_on_a_random_model(tiny):
    model, tok = tiny
    headers = ["Name", "Age", "City"]
    r = generate_table(model, tok, headers, 2, cell_tokens=2, seed=0, max_denoising_steps=2)
    assert r.ok, (r.problems, r.text)
    lines = r.text.split("\n")
    assert lines[:2] == ["| Name | Age | City |", "| --- | --- | --- |"]
    f = r.fills
    assert lines[2:] == [f"|{f[0]} |{f[1]} |{f[2]} |", f"|{f[3]} |{f[4]} |{f[5]} |"]
    assert r.value == [[c.strip() for c in f[:3]], [c.strip() for c in f[3:]]]


def test_validate_table_reports_shape_problems():
    good = "| A | B |\n| --- | --- |\n| 1 | 2 |"
    assert validate_table(good, ["A", "B"], 1) == ([["1", "2"]], [])
    _, problems = validate_table("| A | C |\n| --- | --- |\n| 1 |\n| 2 | 3 |", ["A", "B"], 1)
    assert problems == [
        "header row is not A | B",
        "expected 1 body rows, got 2",
        "row 1 does not have 2 cells",
    ]
    with pytest.raises(ValueError, match="has a '|' or a line break"):
        table_template(None, ["a|b"], 1)
