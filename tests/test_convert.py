"""Converter: HF checkpoint -> MLX folder, streaming, quantized or not, never half-written.

Reference for the logits: the same tiny transformers checkpoint loaded straight from its
HF folder with `load_model` (the loader accepts that layout too). Unquantized fp32 output
must give exactly the same logits. Quantized output must be bit-identical to quantizing
that model in memory with mlx-lm's `quantize_model` (same predicate), so its logits are
compared exactly against that, and only loosely against fp32: the tiny random model is
chaotic (1e-3 relative weight noise moves its logits by ~1.3), so a quantization-sized
error bound would measure the model, not the converter.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers.models.diffusion_gemma")

import mlx.core as mx
from click.testing import CliRunner
from hf_reference import build_hf_checkpoint, checkpoint_keys
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model

import mlx_diffgemma.convert as conv
from mlx_diffgemma import load_model
from mlx_diffgemma.convert import convert, convert_command, estimate_output_bytes

VOCAB = 512


@pytest.fixture(scope="module")
def hf_release(tmp_path_factory):
    # Sharded (several files + index), as the real checkpoint.
    return build_hf_checkpoint(
        tmp_path_factory.mktemp("hf") / "release", style="release", max_shard_size="200KB"
    )


@pytest.fixture(scope="module")
def hf_per_layer(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "per_layer"
    return build_hf_checkpoint(path, style="per_layer", seed=1)


@pytest.fixture(scope="module")
def reference(hf_release):
    return load_model(hf_release)


def leftovers(parent: Path):
    """Anything a failed conversion could have left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def logits(model, self_conditioning=False, seed=0):
    rng = np.random.RandomState(seed)
    cache = model.make_cache()
    # 20 prompt tokens: longer than the tiny sliding window (8).
    model.encode(mx.array(rng.randint(3, VOCAB, (2, 20))), cache)
    canvas = mx.array(rng.randint(3, VOCAB, (2, 8)))
    sc = mx.array(rng.randn(2, 8, VOCAB).astype(np.float32)) if self_conditioning else None
    return model.denoise(canvas, cache, sc)


def params(model):
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("style", ["release", "per_layer"])
def test_fp32_conversion_gives_identical_logits(style, hf_release, hf_per_layer, tmp_path):
    src = hf_release if style == "release" else hf_per_layer
    out = convert(src, tmp_path / "mlx")
    ref, got = load_model(src), load_model(out)
    for sc in (False, True):
        assert mx.array_equal(logits(ref, sc), logits(got, sc)).item()

    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ]
    config = json.loads((out / "config.json").read_text())
    # The source has a vision tower: its config is kept (text-only outputs write null).
    assert isinstance(config["vision_config"], dict) and "quantization" not in config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    # Tied weights once: under model.encoder only the encoder's layer scalars and the
    # vision tower with its projector, every one of the source's.
    encoder = [k for k in index["weight_map"] if k.startswith("model.encoder.")]
    text = [k for k in encoder if ".language_model." in k]
    assert all(k.endswith(".layer_scalar") for k in text) and len(text) == 4
    vision = {k for k in checkpoint_keys(src) if ".vision_tower." in k or ".embed_vision." in k}
    assert vision and vision == set(encoder) - set(text)
    assert got.has_vision and "Text only" not in (out / "README.md").read_text()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("recipe", ["mixed", "uniform"])
def test_quantized_conversion_matches_mlx_lm(recipe, hf_release, reference, tmp_path, monkeypatch):
    # Tiny chunks and shards: every tensor is streamed in many pieces over several files.
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(conv, "MAX_SHARD_BYTES", 100_000)
    out = convert(hf_release, tmp_path / "q", quantize=True, q_group_size=32, quant_recipe=recipe)
    got = load_model(out)

    config = json.loads((hf_release / "config.json").read_text())
    predicate = None if recipe == "mixed" else (lambda p, m: True)
    expected, qconfig = quantize_model(
        load_model(hf_release), config, 32, 4, quant_predicate=predicate
    )
    a, b = params(expected), params(got)
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a), "not bit-identical to mlx-lm"
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization"] == qconfig["quantization"] == saved["quantization_config"]
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1

    layer = got.model.decoder.layers[1]
    assert layer.experts.gate_up_proj.bits == 4 and layer.experts.down_proj.bits == 4
    assert got.model.decoder.self_conditioning.up_proj.bits == 4
    high = 8 if recipe == "mixed" else 4
    embed = got.model.decoder.embed_tokens
    for m in (layer.router.proj, layer.self_attn.q_proj, layer.mlp.gate_proj, embed):
        assert m.bits == high
    # 8-bit overrides use group size 64, which the dense down_proj (input 96) does not divide.
    assert hasattr(layer.mlp.down_proj, "scales") == (recipe == "uniform")

    for sc in (False, True):
        q, ref = logits(got, sc), logits(reference, sc)
        assert mx.array_equal(q, logits(expected, sc)).item()
        # Sanity only (see the module docstring): finite, softcapped, correlated with fp32.
        assert mx.all(mx.abs(q) <= 30.0).item()
        corr = np.corrcoef(np.array(q).ravel(), np.array(ref).ravel())[0, 1]
        assert corr > 0.5


def test_dtype_cast(hf_release, tmp_path):
    out = convert(hf_release, tmp_path / "bf16", quantize=True, q_group_size=32, dtype="bfloat16")
    p = params(load_model(out))
    assert p["model.decoder.norm.weight"].dtype == mx.bfloat16
    assert p["model.decoder.layers.0.experts.gate_up_proj.scales"].dtype == mx.bfloat16
    assert json.loads((out / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"


def test_existing_output_refused_unless_overwrite(hf_release, tmp_path):
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists. Pass --overwrite"):
        convert(hf_release, out)
    assert (out / "keep.txt").exists()
    convert(hf_release, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert leftovers(tmp_path) == []


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard(hf_release, tmp_path):
    src = copy_checkpoint(hf_release, tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out" / "mlx"
    with pytest.raises(ValueError, match=f"Shard .*{shard.name} is truncated"):
        convert(src, out)
    assert not out.parent.exists()  # nothing created, not even the parent folder


def test_missing_shard(hf_release, tmp_path):
    src = copy_checkpoint(hf_release, tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} listed in .* is missing"):
        convert(src, tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()


def test_shape_mismatch(hf_release, tmp_path):
    src = copy_checkpoint(hf_release, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    message = r"down_proj\.weight in .* has shape \[64, 96\], but config.json implies \[64, 128\]"
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()


def test_not_a_diffusion_gemma_checkpoint(hf_release, tmp_path):
    src = copy_checkpoint(hf_release, tmp_path / "src")
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="is not a DiffusionGemma checkpoint"):
        convert(src, tmp_path / "mlx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()


def test_not_enough_disk_space(hf_release, tmp_path, monkeypatch):
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(ValueError, match="Not enough disk space"):
        convert(hf_release, tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_nothing(error, hf_release, tmp_path, monkeypatch):
    calls = []
    real = conv.convert_tensor

    def flaky(job, src, fds):
        calls.append(job.source.key)
        if len(calls) == 20:
            raise error("simulated failure mid-way")
        real(job, src, fds)

    monkeypatch.setattr(conv, "convert_tensor", flaky)
    out = tmp_path / "mlx"
    with pytest.raises(error):
        convert(hf_release, out, quantize=True, q_group_size=32)
    assert not out.exists() and leftovers(tmp_path) == []

    # With --overwrite, a failed conversion keeps the old output.
    out.mkdir()
    (out / "old.txt").write_text("x")
    calls.clear()
    with pytest.raises(error):
        convert(hf_release, out, overwrite=True)
    assert (out / "old.txt").exists() and leftovers(tmp_path) == []


def test_cli_errors_are_one_line(hf_release, tmp_path):
    runner = CliRunner()
    missing = ["--hf-path", str(tmp_path / "nowhere"), "--mlx-path", str(tmp_path / "o")]
    r = runner.invoke(convert_command, missing)
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1

    r = runner.invoke(convert_command, ["--hf-path", str(hf_release), "--q-bits", "5"])
    assert r.exit_code == 2 and "'5' is not one of" in r.output

    out = tmp_path / "cli"
    args = ["--hf-path", str(hf_release), "--mlx-path", str(out), "-q", "--q-group-size", "32"]
    r = runner.invoke(convert_command, args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    r = runner.invoke(convert_command, args)
    assert r.exit_code == 1 and "already exists. Pass --overwrite" in r.output


def test_real_model_sizes_match_the_spec():
    # SPEC §4.3: text part of google/diffusiongemma-26B-A4B-it, 4-bit group 64.
    # ModelArgs defaults are the release text_config but for the full layers' 2 KV heads.
    config = {"model_type": "diffusion_gemma", "text_config": {"num_global_key_value_heads": 2}}
    assert estimate_output_bytes(config) == 50_501_973_624
    assert estimate_output_bytes(config, quantize=True) == 15_401_919_096
    assert estimate_output_bytes(config, quantize=True, quant_recipe="uniform") == 14_204_691_064


def mlx_vlm_predicate(path, module):
    # mlx_vlm/models/diffusion_gemma/diffusion_gemma.py (mlx-vlm 0.7.10), verbatim logic,
    # after mlx-vlm's convert skips the vision tower (`skip_multimodal_module`).
    if ".vision_tower." in path or not hasattr(module, "to_quantized"):
        return False
    if (
        path.endswith(("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
        or ".self_attn." in path
        or "router" in path
    ):
        return {"group_size": 64, "bits": 8}
    return True


def test_loads_mlx_community_layout(hf_release, reference, tmp_path):
    """An mlx-vlm build (as mlx-community's 4-bit repo): HF key names plus .scales/.biases,
    the vision tower kept (unquantized), vision_config kept, and mlx-lm's quantization
    block with 8-bit per-path overrides. (mlx-community's embed_vision projection is
    quantized too; the tiny one's 16 inputs do not divide a group, so here it stays float.)"""
    config = json.loads((hf_release / "config.json").read_text())
    model, qconfig = quantize_model(
        load_model(hf_release), config, 64, 4, quant_predicate=mlx_vlm_predicate
    )
    weights = params(model)

    out = tmp_path / "community"
    out.mkdir()
    keys = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, part in shards.items():
        tensors = {k: weights[k] for k in part}
        mx.save_safetensors(str(out / name), tensors, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    qconfig["quantization_config"] = qconfig["quantization"]
    (out / "config.json").write_text(json.dumps(qconfig))
    shutil.copy(hf_release / "generation_config.json", out)
    assert "vision_config" in qconfig and any("v_proj" in k for k in qconfig["quantization"])

    got = load_model(out)
    for sc in (False, True):
        assert mx.array_equal(logits(got, sc), logits(model, sc)).item()
    assert got.has_vision
    assert got.model.decoder.layers[0].self_attn.q_proj.bits == 8
    assert got.model.decoder.layers[0].experts.gate_up_proj.bits == 4

    # Converting it again is refused with a pointer to loading it directly.
    with pytest.raises(ValueError, match="already quantized"):
        convert(out, tmp_path / "again")


def test_upload_repo(hf_release, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id, exist_ok))

        def upload_large_folder(self, folder_path, repo_id, repo_type):
            calls.append(("upload", sorted(os.listdir(folder_path)), repo_id, repo_type))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = convert(hf_release, tmp_path / "up", upload_repo="me/dg-tiny")
    assert calls[0] == ("create", "me/dg-tiny", True)
    assert calls[1][0] == "upload" and "config.json" in calls[1][1]
    assert calls[1][2:] == ("me/dg-tiny", "model")
    assert 'load("me/dg-tiny")' in (out / "README.md").read_text()


def test_low_precision_experts_warn_and_load_in_float32_on_cpu(hf_release, tmp_path, capfd):
    # Group size 64 quantizes gate_up (input 64) but not down_proj (input 32): as
    # `-q --q-group-size 128` leaves the real model's experts in bf16.
    out = convert(hf_release, tmp_path / "bf16", quantize=True, q_group_size=64, dtype="bfloat16")
    warnings = [s for s in capfd.readouterr().out.splitlines() if "expert matrices" in s]
    assert warnings == [
        "[WARNING] 4 expert matrices are written unquantized in bfloat16 (e.g. "
        "model.decoder.layers.0.experts.down_proj.weight): on the CPU backend the load casts "
        "them to float32; quantize them (-q with a --q-group-size that divides their input "
        "size) or use --dtype float32."
    ]
    model = load_model(out)
    assert capfd.readouterr().err.startswith(
        "[WARNING] The CPU backend runs expert matmuls in float32 only: casting 4 bfloat16 "
    )
    assert params(model)["model.decoder.layers.0.experts.down_proj.weight"].dtype == mx.float32
    assert mx.isfinite(logits(model)).all().item()  # GatherMM runs on the CPU
    convert(hf_release, tmp_path / "q32", quantize=True, q_group_size=32, dtype="bfloat16")
    assert "expert matrices" not in capfd.readouterr().out  # every expert quantized


def test_ctrl_c_exits_130_and_writes_nothing(hf_release, tmp_path, monkeypatch):
    def interrupted(job, src, fds):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "convert_tensor", interrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["--hf-path", str(hf_release), "--mlx-path", str(tmp_path / "mlx")]
    result = CliRunner().invoke(convert_command, args)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.stderr == "Interrupted.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def text_only_copy(src: Path, dst: Path) -> Path:
    """`src` without its vision tower: one shard, no vision keys, no vision_config."""
    dst.mkdir()
    weights = {}
    for f in sorted(src.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    vision = (".vision_tower.", ".embed_vision.")
    mx.save_safetensors(
        str(dst / "model.safetensors"),
        {k: v for k, v in weights.items() if not any(t in k for t in vision)},
        metadata={"format": "pt"},
    )
    config = json.loads((src / "config.json").read_text())
    config.pop("vision_config", None)
    (dst / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "generation_config.json", dst)
    return dst


# Text only (quantized): "vision_config": null, so mlx-vlm builds no tower; with the
# tower kept (fp32): mlx-vlm builds and fills it.
@pytest.mark.parametrize("vision", [False, True])
def test_mlx_vlm_loads_the_converted_folder(vision, hf_release, tmp_path):
    from mlx_vlm.utils import load_model as mlx_vlm_load_model

    src = hf_release if vision else text_only_copy(hf_release, tmp_path / "text")
    out = convert(src, tmp_path / "mlx", quantize=not vision, q_group_size=32)
    vision_config = json.loads((out / "config.json").read_text())["vision_config"]
    assert (vision_config is not None) == vision
    model = mlx_vlm_load_model(out)  # strict: every parameter present, none left over
    assert (model.model.encoder.vision_tower is not None) == vision
    ours = params(load_model(out))
    theirs = dict(tree_flatten(model.parameters()))
    key = "model.decoder.layers.0.experts.gate_up_proj.weight"
    assert mx.array_equal(theirs[key], ours[key])
    assert load_model(out).has_vision == vision
