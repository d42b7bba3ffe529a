"""Tiny from-scratch models: a character-level SentencePiece tokenizer and a small config.

Toys (Sudoku, the tests' tasks) need a vocabulary of a few dozen symbols, not Gemma's
262,144: the output layer is most of a small model's cost. The tokenizer keeps
DiffusionGemma's special ids (<pad> 0, <eos> 1, <bos> 2) and writes every character,
the space included, as one token.
"""

import json
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

PAD, EOS, BOS, UNK = 0, 1, 2, 3


def build_char_tokenizer(folder, alphabet: str) -> Path:
    """Write `tokenizer.model`: one piece per character of `alphabet` (plus specials)."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(alphabet.replace(" ", "")))
    sentences = ["".join(chars), " ".join(chars)] * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(folder / "tokenizer"),
        model_type="char",
        vocab_size=len(chars) + 5,  # specials + the space piece
        pad_id=PAD,
        eos_id=EOS,
        bos_id=BOS,
        unk_id=UNK,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    return folder / "tokenizer.model"


def tiny_config(
    vocab_size: int,
    canvas_length: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_experts: int = 4,
    top_k_experts: int = 2,
    sliding_window: int = 64,
    **overrides,
) -> dict:
    """A DiffusionGemma config.json dict of a small model (last layer full attention)."""
    heads = max(hidden_size // 32, 1)
    text = {
        "model_type": "diffusion_gemma_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "moe_intermediate_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "layer_types": ["sliding_attention"] * (num_hidden_layers - 1) + ["full_attention"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": 32,
        "global_head_dim": 32,
        "num_global_key_value_heads": heads,
        "sliding_window": sliding_window,
        "num_experts": num_experts,
        "top_k_experts": top_k_experts,
        "max_position_embeddings": 4096,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "bos_token_id": BOS,
        **overrides,
    }
    return {
        "model_type": "diffusion_gemma",
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "canvas_length": canvas_length,
        "eos_token_id": [EOS],
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "text_config": text,
    }


def write_generation_config(folder, max_new_tokens: int, max_denoising_steps: int = 16) -> None:
    config = {
        "eos_token_id": [EOS],
        "pad_token_id": PAD,
        "max_new_tokens": max_new_tokens,
        "max_denoising_steps": max_denoising_steps,
        "entropy_bound": 0.1,
        "t_min": 0.4,
        "t_max": 0.8,
        "stability_threshold": 1,
        "confidence_threshold": 0.005,
    }
    (Path(folder) / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_model(
    model,
    config: dict,
    folder,
    tokenizer_from: Optional[Path] = None,
    dtype: Optional[mx.Dtype] = None,
) -> Path:
    """Write a checkpoint folder (config.json + model.safetensors [+ tokenizer.model])."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_from is not None and Path(tokenizer_from) != folder / "tokenizer.model":
        (folder / "tokenizer.model").write_bytes(Path(tokenizer_from).read_bytes())
    return folder


def vocab_of(alphabet: Sequence[str]) -> int:
    return len(set("".join(alphabet).replace(" ", ""))) + 5
