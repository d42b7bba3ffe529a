"""Tests of the transformers reference harness (tests/hf_reference.py) itself."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_reference as H  # noqa: E402
import torch  # noqa: E402

# Against transformers (the torch oracle): the full suite only (README: two tiers).
pytestmark = pytest.mark.slow

P = 20


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfref")
    return {
        "release": H.build_hf_checkpoint(root / "release", style="release", seed=0),
        "per_layer": H.build_hf_checkpoint(root / "per_layer", style="per_layer", seed=0),
        "sharded": H.build_hf_checkpoint(
            root / "sharded", style="release", seed=0, max_shard_size="200KB"
        ),
    }


@pytest.fixture(scope="module")
def model(ckpts):
    return H.load_hf(ckpts["release"])


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    root = tmp_path_factory.mktemp("scen")
    return {name: H.run_scenario(name, root, record_logits=True) for name in H.SCENARIOS}


# ---------------------------------------------------------------------------------------------- config


def test_tiny_config_styles():
    rel = H.tiny_config("release")
    per = H.tiny_config("per_layer")
    rt, pt = rel["text_config"], per["text_config"]
    assert rt["global_head_dim"] == 32 and rt["num_global_key_value_heads"] == 1
    assert "per_layer_config" not in rt
    assert "global_head_dim" not in pt and "num_global_key_value_heads" not in pt
    assert pt["per_layer_config"] == {
        "1": {"head_dim": 32, "num_key_value_heads": 1},
        "3": {"head_dim": 32, "num_key_value_heads": 1},
    }
    assert rt["layer_types"][-1] == "full_attention" and "sliding_attention" in rt["layer_types"]
    assert (
        rel["model_type"] == "diffusion_gemma"
        and rel["vision_config"]["model_type"] == "gemma4_vision"
    )
    for cfg in (rel, per):
        c = H.config_from_dict(cfg).text_config
        assert [c.per_layer_config[i].head_dim for i in range(4)] == [16, 32, 16, 32]
        assert [c.per_layer_config[i].num_key_value_heads for i in range(4)] == [2, 1, 2, 1]
    big = H.tiny_config("per_layer", vocab_size=262144, canvas_length=16, global_head_dim=64)
    assert big["text_config"]["vocab_size"] == 262144 and big["canvas_length"] == 16
    assert big["text_config"]["per_layer_config"]["3"]["head_dim"] == 64
    assert H.tiny_config(num_hidden_layers=6)["text_config"]["layer_types"][-1] == "full_attention"
    with pytest.raises(ValueError):
        H.tiny_config(layer_types=["full_attention", "sliding_attention"])


def test_saved_config_styles(ckpts):
    rel = json.loads((ckpts["release"] / "config.json").read_text())["text_config"]
    per = json.loads((ckpts["per_layer"] / "config.json").read_text())["text_config"]
    assert rel["global_head_dim"] == 32 and "per_layer_config" not in rel
    assert set(per["per_layer_config"]) == {"1", "3"} and "global_head_dim" not in per
    gen = json.loads((ckpts["release"] / "generation_config.json").read_text())
    assert gen == H.RELEASE_GENERATION_CONFIG


# ------------------------------------------------------------------------------------------ checkpoints


def _release_layout(keys):
    assert not any(k.startswith("lm_head") for k in keys)
    enc = [k for k in keys if k.startswith("model.encoder.language_model.")]
    assert sorted(enc) == [
        f"model.encoder.language_model.layers.{i}.layer_scalar" for i in range(4)
    ]
    assert all(H._is_release_key(k) for k in keys)
    assert "model.decoder.layers.1.self_attn.v_proj.weight" not in keys  # full layer: k == v
    assert keys["model.decoder.layers.0.self_attn.v_proj.weight"] == (32, 64)
    assert keys["model.decoder.layers.1.self_attn.q_proj.weight"] == (128, 64)
    assert keys["model.decoder.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert keys["model.decoder.layers.0.experts.gate_up_proj"] == (4, 64, 64)
    assert keys["model.decoder.layers.0.experts.down_proj"] == (4, 64, 32)
    assert keys["model.decoder.embed_tokens.weight"] == (512, 64)


def test_checkpoints_round_trip(ckpts):
    ref = H.read_checkpoint(ckpts["release"])
    for name, path in ckpts.items():
        keys = H.checkpoint_keys(path)
        _release_layout(keys)
        got = H.read_checkpoint(path)
        assert set(got) == set(ref)
        assert all(np.array_equal(got[k], ref[k]) for k in ref), (
            name
        )  # same seed, any style/sharding
        model = H.load_hf(path)
        sd = model.state_dict()
        for k, v in got.items():
            assert torch.equal(sd[k], torch.from_numpy(v)), (name, k)
        for i in range(4):
            assert torch.equal(
                model.model.encoder.language_model.layers[i].layer_scalar,
                torch.from_numpy(got[f"model.encoder.language_model.layers.{i}.layer_scalar"]),
            )
    assert (ckpts["sharded"] / "model.safetensors.index.json").exists()
    assert len(H.checkpoint_files(ckpts["sharded"])) > 1


def test_randomised_tensors(ckpts):
    w = H.read_checkpoint(ckpts["release"])
    for i in range(4):
        enc = w[f"model.encoder.language_model.layers.{i}.layer_scalar"]
        dec = w[f"model.decoder.layers.{i}.layer_scalar"]
        assert enc.shape == dec.shape == (1,) and enc[0] != dec[0] and enc[0] != 1 and dec[0] != 1
    norms = [k for k in w if k.startswith("model.decoder.") and H._NORM_WEIGHT.search(k)]
    assert len(norms) == 4 * 9 + 2  # 7 layer norms + q/k norms per layer, final norm, sc pre_norm
    assert "model.decoder.self_conditioning.pre_norm.weight" in norms
    assert "model.decoder.norm.weight" in norms
    for k in norms + [k for k in w if k.endswith("router.scale") or k.endswith("per_expert_scale")]:
        assert not np.allclose(w[k], 1.0), k
    emb = w["model.decoder.embed_tokens.weight"]
    assert 0.8 < emb[3:].std() < 1.2
    norms = np.linalg.norm(emb, axis=-1)
    assert norms[list(H.EOS_IDS)].mean() > 1.3 * norms[3:].mean()


# ---------------------------------------------------------------------------------------- denoise oracle


def test_denoise_logits(model):
    prompt = H.scenario_prompt(P, seed=3)
    rng = np.random.RandomState(0)
    canvas = rng.randint(0, 512, size=(1, 8))
    block = rng.randint(0, 512, size=(1, 8))
    d = H.HFDenoiser(model, prompt)
    a = d.denoise(canvas)
    assert a.shape == (1, 8, 512) and a.dtype == np.float32
    assert np.abs(a).max() <= 30.0
    assert np.array_equal(a, d.denoise(canvas))  # the decoder does not touch the cache
    assert np.array_equal(a, H.hf_denoise_logits(model, prompt, canvas))
    sc = d.denoise(canvas, a / 0.8)
    assert not np.allclose(sc, a)
    kv = d.cache_kv()
    assert [x["keys"].shape for x in kv] == [
        (1, 2, 7, 16),
        (1, 1, P, 32),
        (1, 2, 7, 16),
        (1, 1, P, 32),
    ]
    d.append(block)
    b = d.denoise(canvas)
    assert not np.allclose(b, a)
    assert np.array_equal(b, H.hf_denoise_logits(model, prompt, canvas, blocks=[block]))
    assert d.cache_kv()[1]["keys"].shape == (1, 1, P + 8, 32)
    # Batch rows are independent.
    two = H.hf_denoise_logits(model, np.repeat(prompt, 2, 0), np.concatenate([canvas, block]))
    np.testing.assert_allclose(two[:1], a, atol=1e-3)  # fp32 rounding differs with batch shape


def test_denoise_matches_generate_steps(scenarios):
    """The raw logits of generate's steps == HFDenoiser on the recorded canvases (ties the two helpers)."""
    sc = scenarios["eos_run"]
    tr, model = sc["trace"], sc["model"]
    d = H.HFDenoiser(model, sc["input_ids"])
    for ci, cv in enumerate(tr["canvases"][:2]):
        if ci:
            d.append(tr["canvases"][ci - 1]["final"])
        s0, s1 = cv["steps"][0], cv["steps"][1]
        np.testing.assert_allclose(d.denoise(s0["canvas_in"]), s0["raw_logits"], atol=1e-5, rtol=0)
        got = d.denoise(s1["canvas_in"], s0["processed_logits"])
        np.testing.assert_allclose(got, s1["raw_logits"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- traces


def _entropy_bound_mask(ent, bound):
    order = np.argsort(ent, axis=-1, kind="stable")
    s = np.take_along_axis(ent, order, -1)
    keep = np.cumsum(s, -1) - s <= bound
    mask = np.zeros_like(keep)
    np.put_along_axis(mask, order, keep, -1)
    return mask


def _check_trace(tr, prompt):
    C, cfg = tr["canvas_length"], tr["config"]
    N, eos, pad = cfg["max_denoising_steps"], cfg["eos_token_id"], cfg["pad_token_id"]
    seq = tr["sequences"]
    k = tr["num_canvases"]
    assert seq.shape == (prompt.shape[0], P + k * C)
    assert np.array_equal(seq[:, :P], prompt)
    assert np.array_equal(np.concatenate([cv["final"] for cv in tr["canvases"]], -1), seq[:, P:])
    kinds = [d["kind"] for d in tr["draws"]]
    steps = sum(tr["num_steps"])
    assert kinds.count("multinomial") == kinds.count("renoise") == steps
    assert kinds.count("init") == k and kinds.count("other") == 0
    # Draw order: init, then (multinomial, renoise) per step, canvas after canvas.
    expect = []
    for n in tr["num_steps"]:
        expect += ["init"] + ["multinomial", "renoise"] * n
    assert [x for x in kinds if x != "init_unused"] == expect
    draws = {(d["kind"], d["canvas"], d["step"]): d["value"] for d in tr["draws"]}
    for ci, cv in enumerate(tr["canvases"]):
        assert np.array_equal(cv["decoder_positions"], np.arange(P + ci * C, P + (ci + 1) * C))
        if ci == 0:
            assert np.array_equal(cv["encoder_positions"], np.arange(P))
            assert np.array_equal(cv["encoder_input_ids"], prompt)
        else:
            prev = tr["canvases"][ci - 1]
            assert np.array_equal(cv["encoder_positions"], prev["decoder_positions"])
            assert np.array_equal(cv["encoder_input_ids"], prev["final"])
        assert np.array_equal(draws[("init", ci, -1)], cv["init_canvas"])
        assert cv["num_steps"] == len(cv["steps"]) <= N
        prev_out = cv["init_canvas"]
        for si, st in enumerate(cv["steps"]):
            assert st["cur_step"] == N - si
            temp = cfg["t_min"] + (cfg["t_max"] - cfg["t_min"]) * st["cur_step"] / N
            assert np.isclose(st["temperature"], temp)
            assert np.array_equal(st["canvas_in"], prev_out)
            assert np.array_equal(draws[("multinomial", ci, si)], st["sampled"])
            assert np.array_equal(draws[("renoise", ci, si)], st["renoise_draw"])
            m = st["accepted_mask"]
            assert m.any(-1).all()  # the lowest-entropy position is always accepted
            assert np.array_equal(m, _entropy_bound_mask(st["entropy"], cfg["entropy_bound"]))
            assert np.array_equal(st["accepted"], np.where(m, st["sampled"], st["canvas_in"]))
            assert np.array_equal(st["renoised"], np.where(m, st["accepted"], st["renoise_draw"]))
            fin = st["finished_before"][:, None]
            assert np.array_equal(st["canvas_out"], np.where(fin, st["canvas_in"], st["renoised"]))
            if "processed_logits" in st:
                assert np.array_equal(
                    st["argmax"][~st["finished_before"]],
                    st["processed_logits"].argmax(-1)[~st["finished_before"]],
                )
                np.testing.assert_allclose(
                    st["processed_logits"],
                    st["raw_logits"] / st["temperature"],
                    rtol=1e-6,
                    atol=1e-6,
                )
            prev_out = st["canvas_out"]
        last = cv["steps"][-1]
        assert np.array_equal(cv["appended"], last["argmax"])  # the ARGMAX canvas is appended
        assert cv["early_stop"] == (cv["num_steps"] < N)
        if cv["early_stop"]:
            assert last["finished_denoising"].all()
            assert np.array_equal(last["argmax"], cv["steps"][-2]["argmax"])  # stable (threshold 1)
            assert (last["entropy"].mean(-1) < cfg["confidence_threshold"]).all()
    # EOS / pad: everything after the first EOS of the new tokens is pad.
    new = seq[:, P:]
    for row, fin in zip(new, tr["finished"]):
        hits = np.flatnonzero(np.isin(row, eos))
        assert fin == (hits.size > 0)
        if hits.size:
            assert (row[hits[0] + 1 :] == pad).all()
    tpf = (new != pad).sum(-1) / tr["decoder_forward_passes"]
    np.testing.assert_allclose(tr["tokens_per_forward"], tpf, rtol=1e-6)


def test_eos_run(scenarios):
    sc = scenarios["eos_run"]
    tr = sc["trace"]
    _check_trace(tr, sc["input_ids"])
    assert tr["num_canvases"] >= 3 and tr["finished"].all()
    assert H.eos_run_ok(tr)
    assert (
        tr["config"]["confidence_threshold"] == 0.005 and tr["config"]["max_denoising_steps"] == 48
    )
    assert tr["config"]["eos_token_id"] == [1, 106, 50]
    # multi-token acceptance happens
    assert max(int(st["accepted_mask"].sum()) for cv in tr["canvases"] for st in cv["steps"]) > 1


def test_early_stop_run(scenarios):
    sc = scenarios["early_stop_run"]
    tr = sc["trace"]
    _check_trace(tr, sc["input_ids"])
    assert any(n < 48 for n in tr["num_steps"])
    assert (
        tr["config"]["confidence_threshold"] == 0.005 and tr["config"]["stability_threshold"] == 1
    )


def test_trace_deterministic_and_user_canvas(model):
    prompt = np.repeat(H.scenario_prompt(P, seed=5), 2, 0)
    kw = dict(max_new_tokens=16, max_denoising_steps=6)
    a = H.trace_hf_generate(model, prompt, seed=7, **kw)
    b = H.trace_hf_generate(model, prompt, seed=7, **kw)
    c = H.trace_hf_generate(model, prompt, seed=8, **kw)
    _check_trace(a, prompt)
    assert np.array_equal(a["sequences"], b["sequences"])
    assert len(a["draws"]) == len(b["draws"])
    for x, y in zip(a["draws"], b["draws"]):
        assert x["kind"] == y["kind"] and np.array_equal(x["value"], y["value"])
    assert not np.array_equal(a["draws"][0]["value"], c["draws"][0]["value"])
    # A user canvas: the init draw still happens (evaluated as the pop() default) but is not used.
    user = np.arange(16, dtype=np.int64).reshape(2, 8) + 10
    u = H.trace_hf_generate(model, prompt, seed=7, decoder_input_ids=torch.from_numpy(user), **kw)
    assert u["draws"][0]["kind"] == "init_unused"
    assert np.array_equal(u["draws"][0]["value"], a["draws"][0]["value"])
    assert np.array_equal(u["canvases"][0]["init_canvas"], user)
    assert np.array_equal(u["canvases"][0]["steps"][0]["canvas_in"], user)
    if u["num_canvases"] > 1:
        assert u["canvases"][1]["init_canvas"].shape == (2, 8)
