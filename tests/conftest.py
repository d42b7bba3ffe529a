"""Shared fixtures: tiny converted checkpoints that carry the real Gemma 4 tokenizer."""

import json
import shutil
import signal
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tokenizer_fixture import gemma4_spm_path

from mlx_diffgemma.model import Model, ModelArgs

EOS = [1, 106, 50]
REAL_VOCAB = 262144  # the real tokenizer's: checkpoints that decode text need it
SMALL_VOCAB = 4096  # token-level tests: every step's softmax 64x cheaper
TINY_CONFIG = {
    "model_type": "diffusion_gemma",
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "canvas_length": 8,
    "eos_token_id": EOS,
    "text_config": {
        "model_type": "diffusion_gemma_text",
        "vocab_size": REAL_VOCAB,
        "hidden_size": 16,
        "intermediate_size": 32,
        "moe_intermediate_size": 8,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "global_head_dim": 16,
        "num_global_key_value_heads": 1,
        "sliding_window": 16,
        "num_experts": 4,
        "top_k_experts": 2,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    },
}
# Few steps keep each generation well under a second on a CPU (the 262144-way softmaxes
# dominate); a random model never stops a canvas early.
TINY_GENERATION_CONFIG = {
    "confidence_threshold": 0.005,
    "eos_token_id": EOS,
    "max_denoising_steps": 2,
    "max_new_tokens": 8,
    "pad_token_id": 0,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "stability_threshold": 1,
    "t_max": 0.8,
    "t_min": 0.4,
}


def random_tiny_model(
    seed: int = 0, canvas_length: int = 8, vocab_size: int = SMALL_VOCAB
) -> Model:
    """Random weights; norms and scalars around 1. The small vocabulary serves tests on
    token ids; pass REAL_VOCAB for a model that decodes text with the real tokenizer."""
    mx.random.seed(seed)
    text = {**TINY_CONFIG["text_config"], "vocab_size": vocab_size}
    config = {**TINY_CONFIG, "canvas_length": canvas_length, "text_config": text}
    model = Model(ModelArgs.from_dict(config))
    model.load_weights(
        [
            (k, mx.random.normal(v.shape) * 0.5 + (1.0 if "norm" in k or "scal" in k else 0.0))
            for k, v in tree_flatten(model.parameters())
        ]
    )
    return model


def default_sigint() -> None:
    """`Popen(preexec_fn=...)` for tests that press Ctrl-C: the child gets SIGINT's default
    disposition, as from a terminal. A shell's background job (`nohup ... &`, some CI
    runners) starts with SIGINT ignored, and Python turns SIGINT into KeyboardInterrupt
    only when it was not ignored at startup."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def save_checkpoint(model: Model, path: Path) -> Path:
    """An MLX folder as `convert` writes it, plus the SentencePiece tokenizer."""
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    text = {**TINY_CONFIG["text_config"], "vocab_size": model.args.vocab_size}
    config = {**TINY_CONFIG, "text_config": text}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(TINY_GENERATION_CONFIG, indent=2))
    shutil.copyfile(gemma4_spm_path(), path / "tokenizer.model")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny DiffusionGemma: it babbles and never emits EOS."""
    model = random_tiny_model(vocab_size=REAL_VOCAB)
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny") / "random")


@pytest.fixture(scope="session")
def tiny_eos_checkpoint(tmp_path_factory) -> Path:
    """A tiny DiffusionGemma whose every position argmaxes to `<turn|>` (106), an EOS id.

    Every embedding row gets a large shared component on dimension 0, which dominates the
    residual stream; row 106 gets a larger one, and the final norm keeps only that
    dimension, so the tied LM head ranks 106 first.
    """
    model = random_tiny_model(vocab_size=REAL_VOCAB)
    embed = model.model.decoder.embed_tokens.weight
    embed[:, 0] = 3.0
    embed[106, 0] = 10.0
    norm = mx.zeros((TINY_CONFIG["text_config"]["hidden_size"],))
    norm[0] = 1.0
    model.model.decoder.norm.weight = norm
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny") / "eos")


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """(model, tokenizer) of `tiny_checkpoint`, loaded once."""
    from mlx_diffgemma import load

    return load(tiny_checkpoint)


@pytest.fixture(scope="session")
def tok(tiny):
    return tiny[1]
