"""Fine-tune DiffusionGemma with its own objective: `python -m mlx_diffgemma.lora`.

Flags follow mlx_lm.lora (a quantized --model means QLoRA; `lora_parameters` only in
the --config YAML), plus the objective's own: --self-conditioning-prob,
--encoder-loss-weight, --t-eps, --freeze-router, and --init-config for a model
trained from scratch (random weights from a config.json; --model then only supplies
the tokenizer and generation_config.json, and --fine-tune-type must be full).

    python -m mlx_diffgemma.lora --model M --train --data DIR --iters 600
    python -m mlx_diffgemma.lora --model M --adapter-path adapters --data DIR --test
"""

import argparse
import json
import math
import sys
import types
from pathlib import Path

import mlx.core as mx
import yaml
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.utils import save_config

from .options import interrupted_line, passthrough_command, prog_name
from .tuner import adapters as A
from .tuner.data import check_lengths, load_dataset
from .tuner.init import init_model, read_init_config
from .tuner.losses import Objective
from .tuner.trainer import ProgressReport, evaluate_loss, make_optimizer, train

CONFIG_DEFAULTS = {
    "model": None,
    "train": False,
    "fine_tune_type": "lora",
    "data": None,
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1.5e-4,  # Google's SFT recipe
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "config": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "lr_schedule": None,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    "self_conditioning_prob": 0.5,
    "encoder_loss_weight": 1.0,
    "t_eps": 1e-4,
    "freeze_router": False,
    "init_config": None,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("python -m mlx_diffgemma.lora"),
        description="LoRA, DoRA, QLoRA or full fine-tuning with DiffusionGemma's objective.",
    )
    a = p.add_argument
    a("--model", help="Model folder or hub repo (a quantized model means QLoRA).")
    a("--train", action="store_true", default=None, help="Do training.")
    a("--data", help="Folder with train/valid/test.jsonl (chat, completions or text).")
    a("--fine-tune-type", choices=["lora", "dora", "full"], help="lora (default), dora or full.")
    a("--num-layers", type=int, help="Layers to fine-tune, from the last; -1 for all [16].")
    a("--batch-size", type=int, help="Minibatch size [4].")
    a("--iters", type=int, help="Iterations to train for [1000].")
    a("--val-batches", type=int, help="Validation batches, -1 for the whole set [25].")
    a("--learning-rate", type=float, help="Peak Adam learning rate [1.5e-4].")
    a("--steps-per-report", type=int, help="Steps between loss reports [10].")
    a("--steps-per-eval", type=int, help="Steps between validations [200].")
    a("--grad-accumulation-steps", type=int, help="Steps accumulated per update [1].")
    a("--resume-adapter-file", help="Start from these fine-tuned weights.")
    a("--adapter-path", help="Save/load folder of the fine-tuned weights [adapters].")
    a("--save-every", type=int, help="Save every N iterations [100].")
    a("--test", action="store_true", default=None, help="Evaluate on test.jsonl.")
    a("--test-batches", type=int, help="Test batches, -1 for the whole set [500].")
    a("--max-seq-length", type=int, help="Longest prompt + answer canvases [2048].")
    a("-c", "--config", help="YAML file with these options (and lora_parameters).")
    a("--grad-checkpoint", action="store_true", default=None, help="Recompute layers in backward.")
    a("--seed", type=int, help="PRNG seed (batches, noise, t, canvases, self-conditioning) [0].")
    a(
        "--self-conditioning-prob",
        type=float,
        help="Per-example self-conditioning probability [0.5].",
    )
    a("--encoder-loss-weight", type=float, help="Weight of the encoder's next-token loss [1.0].")
    a("--t-eps", type=float, help="Noise levels t ~ U(t_eps, 1) [1e-4].")
    a("--freeze-router", action="store_true", default=None, help="Do not train the MoE router.")
    a("--init-config", help="config.json of a model to train from scratch (random init).")
    return p


def parse_args(argv=None) -> types.SimpleNamespace:
    """Flags > --config YAML > defaults, as mlx_lm.lora."""
    args = vars(build_parser().parse_args(argv))
    if args["config"]:
        with open(args["config"]) as f:
            for k, v in (yaml.safe_load(f) or {}).items():
                if k not in CONFIG_DEFAULTS:
                    raise ValueError(f"Unknown key {k!r} in --config {args['config']}.")
                if args.get(k) is None:
                    args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    lp = {**CONFIG_DEFAULTS["lora_parameters"], **(args["lora_parameters"] or {})}
    args["lora_parameters"] = lp
    return types.SimpleNamespace(**args)


def load_base(args):
    """(model, tokenizer): the --model checkpoint, or a random --init-config model."""
    from .loader import get_model_path, load
    from .tokenizer import Tokenizer

    if args.model is None:
        raise ValueError("--model is required (with --init-config: the tokenizer's folder).")
    if args.init_config is None:
        return load(args.model)
    if args.fine_tune_type != "full":
        raise ValueError("--init-config trains from scratch: use --fine-tune-type full.")
    path = get_model_path(args.model)
    model = init_model(read_init_config(args.init_config), args.seed)
    from .config import DiffusionConfig

    model.generation_config = DiffusionConfig.from_pretrained(path)
    return model, Tokenizer.from_pretrained(path)


def wire(args, model) -> None:
    """Make the chosen weights trainable (LoRA layers in place for lora/dora)."""
    if args.fine_tune_type == "full":
        A.setup_full(model, args.num_layers, args.freeze_router)
        args.lora_parameters = None
        return
    lp = dict(args.lora_parameters)
    if lp.get("keys") is None:
        lp["keys"] = A.default_lora_keys(model, args.freeze_router, args.fine_tune_type == "dora")
    args.lora_parameters = lp
    A.setup_lora(model, args.num_layers, lp, dora=args.fine_tune_type == "dora")


def objective(args) -> Objective:
    return Objective(
        self_conditioning_prob=args.self_conditioning_prob,
        encoder_loss_weight=args.encoder_loss_weight,
        t_eps=args.t_eps,
        grad_checkpoint=bool(args.grad_checkpoint),
    )


def run_training(args, model, tokenizer, data) -> None:
    wire(args, model)
    if args.resume_adapter_file is not None:
        weights = mx.load(args.resume_adapter_file)
        A.check_adapter_weights(
            model, weights, args.fine_tune_type == "full", args.resume_adapter_file
        )
        model.load_weights(list(weights.items()), strict=False)
    print(A.trainable_summary(model), flush=True)
    out = Path(args.adapter_path)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    if args.init_config is not None:
        config["init_config"] = read_init_config(args.init_config)
    save_config(config, out / "adapter_config.json")
    targs = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters,
        val_batches=args.val_batches,
        steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval,
        steps_per_save=args.save_every,
        adapter_file=out / "adapters.safetensors",
        max_seq_length=args.max_seq_length,
        grad_accumulation_steps=args.grad_accumulation_steps,
    )
    opt = make_optimizer(args.learning_rate, args.iters, args.lr_schedule)
    train(
        model,
        data["train"],
        data["valid"],
        targs,
        objective(args),
        opt,
        tokenizer.pad_token_id,
        args.seed,
        ProgressReport(),
    )


def run(args) -> None:
    model, tokenizer = load_base(args)
    if args.data is None:
        raise ValueError("--data is required: a folder with train/valid/test.jsonl.")
    data = load_dataset(args.data, tokenizer)
    C = model.args.canvas_length
    for name, examples in data.items():
        check_lengths(examples, C, args.max_seq_length, name)
    if args.train:
        if not data["train"]:
            raise ValueError(f"--train needs {args.data}/train.jsonl with examples.")
        run_training(args, model, tokenizer, data)
    elif args.test:
        if args.adapter_path != "":  # "" tests the base model, as mlx_lm.lora
            A.load_adapters(model, args.adapter_path)
    else:
        raise ValueError("Pass --train, --test or both.")
    if args.test:
        if not data["test"]:
            raise ValueError(f"--test needs {args.data}/test.jsonl with examples.")
        loss, secs = evaluate_loss(
            model,
            data["test"],
            args.batch_size,
            args.test_batches,
            objective(args),
            tokenizer.pad_token_id,
            args.max_seq_length,
            args.seed,
        )
        print(f"Test loss {loss:.4f}, test ppl {math.exp(min(loss, 50)):.3f} ({secs:.1f}s).")


def main(argv=None) -> None:
    """Entry point (the lead's `mlx_diffgemma lora` subcommand can call this)."""
    try:
        run(parse_args(argv))
    except (OSError, ValueError, KeyError, json.JSONDecodeError, yaml.YAMLError) as e:
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except KeyboardInterrupt:  # as `mlx_diffgemma lora` ends: one line, status 130
        sys.exit(interrupted_line())


lora_command = passthrough_command(
    "lora", main, "Fine-tune with DiffusionGemma's objective (LoRA, DoRA or full)."
)


if __name__ == "__main__":
    main()
