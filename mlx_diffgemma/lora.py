"""Fine-tune DiffusionGemma with its own objective: `python -m mlx_diffgemma.lora`.

Flags follow mlx_lm.lora (a quantized --model means QLoRA; `lora_parameters` only in
the --config YAML), plus the objective's own: --self-conditioning-prob,
--encoder-loss-weight, --t-eps, --freeze-router, and --init-config for a model
trained from scratch (random weights from a config.json; --model then only supplies
the tokenizer and generation_config.json, and --fine-tune-type must be full).

    python -m mlx_diffgemma.lora --model M --train --data DIR --iters 600
    python -m mlx_diffgemma.lora --model M --adapter-path adapters --data DIR --test
"""

import json
import math
import sys
import types
from pathlib import Path

import click
import mlx.core as mx
import yaml
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.utils import save_config

from .options import CONTEXT_SETTINGS, interrupted_line, one_line, run_command
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


# The flags, as mlx_lm.lora names them (and the objective's own): (flag, type, help);
# "flag" is an on/off switch. Every default is None here, so --config can fill it.
FLAGS = [
    ("--model", str, "Model folder or hub repo (a quantized model means QLoRA)."),
    ("--train", "flag", "Do training."),
    ("--data", str, "Folder with train/valid/test.jsonl (chat, completions or text)."),
    ("--fine-tune-type", click.Choice(["lora", "dora", "full"]), "lora (default), dora or full."),
    ("--num-layers", int, "Layers to fine-tune, from the last; -1 for all [16]."),
    ("--batch-size", int, "Minibatch size [4]."),
    ("--iters", int, "Iterations to train for [1000]."),
    ("--val-batches", int, "Validation batches, -1 for the whole set [25]."),
    ("--learning-rate", float, "Peak Adam learning rate [1.5e-4]."),
    ("--steps-per-report", int, "Steps between loss reports [10]."),
    ("--steps-per-eval", int, "Steps between validations [200]."),
    ("--grad-accumulation-steps", int, "Steps accumulated per update [1]."),
    ("--resume-adapter-file", str, "Start from these fine-tuned weights."),
    ("--adapter-path", str, "Save/load folder of the fine-tuned weights [adapters]."),
    ("--save-every", int, "Save every N iterations [100]."),
    ("--test", "flag", "Evaluate on test.jsonl."),
    ("--test-batches", int, "Test batches, -1 for the whole set [500]."),
    ("--max-seq-length", int, "Longest prompt + answer canvases [2048]."),
    ("--config", str, "YAML file with these options (and lora_parameters)."),
    ("--grad-checkpoint", "flag", "Recompute layers in backward."),
    ("--seed", int, "PRNG seed (batches, noise, t, canvases, self-conditioning) [0]."),
    ("--self-conditioning-prob", float, "Per-example self-conditioning probability [0.5]."),
    ("--encoder-loss-weight", float, "Weight of the encoder's next-token loss [1.0]."),
    ("--t-eps", float, "Noise levels t ~ U(t_eps, 1) [1e-4]."),
    ("--freeze-router", "flag", "Do not train the MoE router."),
    ("--init-config", str, "config.json of a model to train from scratch (random init)."),
]


def flag_options(flags):
    """Click options for (flag, type, help) rows, every default None."""

    def add(command):
        for flag, kind, text in reversed(flags):
            decls = ("-c", flag) if flag == "--config" else (flag,)
            if kind == "flag":
                command = click.option(*decls, is_flag=True, default=None, help=text)(command)
            else:
                command = click.option(*decls, type=kind, default=None, help=text)(command)
        return command

    return add


def merge_config(params: dict, defaults: dict) -> types.SimpleNamespace:
    """Flags > --config YAML > defaults, as mlx_lm.lora."""
    args = dict(params)
    if args.get("config"):
        with open(args["config"]) as f:
            for k, v in (yaml.safe_load(f) or {}).items():
                if k not in defaults:
                    raise ValueError(f"Unknown key {k!r} in --config {args['config']}.")
                if args.get(k) is None:
                    args[k] = v
    for k, v in defaults.items():
        if args.get(k) is None:
            args[k] = v
    if "lora_parameters" in defaults:
        args["lora_parameters"] = {**defaults["lora_parameters"], **(args["lora_parameters"] or {})}
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
    from .diffusion.config import DiffusionConfig

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


def start_adapter(args, model) -> Path:
    """Wire the trainable weights, resume them if asked, write adapter_config.json;
    the adapter folder (lora and distill share this)."""
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
    if getattr(args, "init_config", None) is not None:
        config["init_config"] = read_init_config(args.init_config)
    save_config(config, out / "adapter_config.json")
    return out


def training_args(args, out: Path) -> TrainingArgs:
    return TrainingArgs(
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


def run_training(args, model, tokenizer, data) -> None:
    out = start_adapter(args, model)
    targs = training_args(args, out)
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


@click.command(name="lora", context_settings=CONTEXT_SETTINGS)
@flag_options(FLAGS)
def lora_command(**params):
    """Fine-tune with DiffusionGemma's objective (LoRA, DoRA or full).

    mlx_lm.lora's flags; a quantized --model means QLoRA. Flags > --config YAML > defaults.
    """
    try:
        run(merge_config(params, CONFIG_DEFAULTS))
    except (OSError, ValueError, KeyError, json.JSONDecodeError, yaml.YAMLError) as e:
        sys.exit(f"error: {one_line(e)}")
    except KeyboardInterrupt:  # as every command ends: one line, status 130
        sys.exit(interrupted_line())


def main(argv=None) -> None:
    """`python -m mlx_diffgemma.lora ...`; returns when the run succeeds."""
    run_command(lora_command, argv, "python -m mlx_diffgemma.lora")


if __name__ == "__main__":
    main()
