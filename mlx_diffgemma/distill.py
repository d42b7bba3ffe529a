"""Few-step distillation: `python -m mlx_diffgemma.distill` (also `mlx_diffgemma distill`).

A student learns to finish a canvas in at most --max-steps denoising steps from the
exact sampler's own runs of a frozen teacher (the model itself by default, with
--teacher-adapter-path if given): certainty-forcing self-distillation
(`tuner/certainty.py`, docs/FINE_TUNING.md). Flags and files follow mlx_lm.lora's
(a quantized --model means QLoRA); the output is an adapter folder that `load(...,
adapter_path=)`, --adapter-path, `fuse` and the server take like a LoRA adapter.

    python -m mlx_diffgemma.distill --model M --data DIR --max-steps 2 --iters 600

--data holds train.jsonl (and optionally valid.jsonl) of prompts: completions records
with or without a completion, or chat records (a last assistant turn is ignored). The
teacher's trajectories are cached in ADAPTER_PATH/trajectories/ and reused.
"""

import json
import sys
from pathlib import Path

import click
import yaml

from .lora import CONFIG_DEFAULTS as LORA_DEFAULTS
from .lora import FLAGS as LORA_FLAGS
from .lora import flag_options, merge_config, start_adapter, training_args
from .options import CONTEXT_SETTINGS, interrupted_line, one_line, run_command
from .tuner import trajectories as T
from .tuner.certainty import Certainty, StepBatches, make_certainty_loss
from .tuner.data import load_jsonl, prompt_from_record
from .tuner.trainer import ProgressReport, fit, make_optimizer

_LORA_KEPT = {
    "--model", "--data", "--fine-tune-type", "--num-layers", "--batch-size", "--iters",
    "--val-batches", "--learning-rate", "--steps-per-report", "--steps-per-eval",
    "--grad-accumulation-steps", "--resume-adapter-file", "--adapter-path", "--save-every",
    "--max-seq-length", "--config", "--grad-checkpoint", "--seed", "--encoder-loss-weight",
    "--freeze-router",
}  # fmt: skip
_DATA = ("--data", str, "Folder with train.jsonl (and valid.jsonl) of prompts.")
_FLAGS = [_DATA if f[0] == "--data" else f for f in LORA_FLAGS if f[0] in _LORA_KEPT] + [
    ("--teacher", str, "The teacher's model folder or hub repo [the --model itself]."),
    ("--teacher-adapter-path", str, "An adapter applied to the teacher (frozen)."),
    (
        "--max-steps",
        int,
        "Train on the inputs of the teacher's first K steps per canvas, the steps the "
        "student should need at most; K >= the teacher's steps uses them all [2].",
    ),
    ("--certainty-weight", float, "Weight of the certainty-forcing entropy term [1.0]."),
    ("--teacher-batch-size", int, "Prompts the teacher generates at once [64]."),
]
CONFIG_DEFAULTS = {
    **{k: v for k, v in LORA_DEFAULTS.items() if "--" + k.replace("_", "-") in _LORA_KEPT},
    "lora_parameters": LORA_DEFAULTS["lora_parameters"],
    "lr_schedule": None,
    "teacher": None,
    "teacher_adapter_path": None,
    "max_steps": 2,
    "certainty_weight": 1.0,
    "teacher_batch_size": 64,
}


def _prompts(data: Path, tokenizer):
    """{train, valid}: rendered prompts (valid may be empty)."""
    if not data.is_dir():
        raise ValueError(f"--data {data} is not a folder; pass one with train.jsonl.")
    out = {}
    for split in ("train", "valid"):
        path = data / f"{split}.jsonl"
        out[split] = load_jsonl(path, tokenizer, prompt_from_record) if path.exists() else []
    if not out["train"]:
        raise ValueError(f"{data / 'train.jsonl'} has no prompts; add prompt or messages records.")
    return out


def _check_teacher(teacher, student, where: str):
    for name in ("vocab_size", "canvas_length"):
        a, b = getattr(teacher.args, name), getattr(student.args, name)
        if a != b:
            raise ValueError(
                f"The teacher {where} has {name} {a}, the student {b}; distill from a "
                "teacher with the student's tokenizer and canvas."
            )


def _teacher_id(args) -> dict:
    """What identifies the teacher's weights, for the trajectory cache's key."""
    from .loader import get_model_path

    folders = [get_model_path(args.teacher or args.model)]
    if args.teacher_adapter_path:
        folders.append(Path(args.teacher_adapter_path))
    files = [f for d in folders for f in sorted(Path(d).glob("*.safetensors"))]
    return {"files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime) for f in files]}


def _trajectories(args, teacher, config, prompts):
    """{train, valid} teacher trajectories, from the cache when it has them."""
    C = teacher.args.canvas_length
    folder = Path(args.adapter_path) / "trajectories"
    teacher_id = _teacher_id(args)
    out = {}
    for split, rows in prompts.items():
        if not rows:
            out[split] = []
            continue
        key = T.cache_key(teacher_id, rows, config, args.seed)
        path = folder / f"{split}-{key}.npz"
        runs = T.load(path, C)
        if runs is None:
            runs = T.teacher_trajectories(teacher, rows, config, args.seed, args.teacher_batch_size)
            T.save(path, runs)
        print(f"Teacher on {split}: {T.summary(runs)} ({path}).", flush=True)
        out[split] = runs
    return out


def run(args) -> None:
    from .generate import resolve_config
    from .loader import load

    obj = Certainty(
        max_steps=args.max_steps,
        certainty_weight=args.certainty_weight,
        encoder_loss_weight=args.encoder_loss_weight,
        grad_checkpoint=bool(args.grad_checkpoint),
    )
    if args.model is None:
        raise ValueError("--model is required.")
    if args.data is None:
        raise ValueError("--data is required: a folder with train.jsonl of prompts.")
    teacher, tokenizer = load(args.teacher or args.model, adapter_path=args.teacher_adapter_path)
    config = resolve_config(teacher)
    prompts = _prompts(Path(args.data), tokenizer)
    # Lazy: the student's weights are read when training first uses them, after the
    # teacher is freed, so the two models are never in memory together.
    student, _ = load(args.model, lazy=True)
    _check_teacher(teacher, student, args.teacher or args.model)
    data = _trajectories(args, teacher, config, prompts)
    del teacher  # only its trajectories are needed from here on
    out = start_adapter(args, student)
    fit(
        student,
        make_optimizer(args.learning_rate, args.iters, args.lr_schedule),
        data["train"],
        data["valid"],
        training_args(args, out),
        make_certainty_loss(obj),
        StepBatches(student, config, obj, args.seed),
        args.seed,
        ProgressReport(),
    )


@click.command(name="distill", context_settings=CONTEXT_SETTINGS)
@flag_options(_FLAGS)
def distill_command(**params):
    """Distill a model into one that needs few denoising steps per canvas.

    mlx_lm.lora's flags plus --teacher, --teacher-adapter-path and --max-steps; the output
    is an adapter (a quantized --model means QLoRA). Flags > --config YAML > defaults.
    """
    try:
        run(merge_config(params, CONFIG_DEFAULTS))
    except (OSError, ValueError, KeyError, json.JSONDecodeError, yaml.YAMLError) as e:
        sys.exit(f"error: {one_line(e)}")
    except KeyboardInterrupt:
        sys.exit(interrupted_line())


def main(argv=None) -> None:
    """`python -m mlx_diffgemma.distill ...`; returns when the run succeeds."""
    run_command(distill_command, argv, "python -m mlx_diffgemma.distill")


if __name__ == "__main__":
    main()
