"""The training loop: mlx-lm's `train` with the diffusion objective as its loss.

mlx-lm's loop compiles the step, accumulates gradients, validates and saves
`adapters.safetensors` (the trainable parameters) exactly as mlx_lm.lora does; this
module supplies the batches (with the objective's random draws), the loss, Google's
optimizer (Adam with betas 0.95/0.99, linear warmup then cosine decay) and a progress
line with loss, it/s, tokens/s and peak memory. On a terminal mlx-lm's live table shows
the progress; off one (a log file, a pipe) only the plain lines do, with no colour codes.
"""

import contextlib
import sys
import time
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.optimizers as optim
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, evaluate
from mlx_lm.tuner.trainer import train as mlx_lm_train
from mlx_lm.tuner.utils import build_schedule

from .data import BatchIterator, Example, split_batch
from .losses import Objective, diffusion_loss

ADAM_BETAS = (0.95, 0.99)


def make_loss(objective: Objective) -> Callable:
    """loss(model, *arrays) for mlx-lm's trainer, over `BatchIterator`'s flat batches."""

    def loss(model, *arrays):
        batch, draws = split_batch(arrays)
        return diffusion_loss(model, batch, draws, objective)

    return loss


def warmup_cosine(learning_rate: float, iters: int, warmup: Optional[int] = None):
    """Linear warmup (5% of the steps by default) then cosine decay to 0."""
    warmup = max(1, iters // 20) if warmup is None else warmup
    return build_schedule(
        {
            "name": "cosine_decay",
            "arguments": [learning_rate, max(iters - warmup, 1), 0.0],
            "warmup": warmup,
        }
    )


def make_optimizer(learning_rate: float, iters: int, lr_schedule: Optional[dict] = None):
    """Adam(0.95, 0.99) on warmup-cosine, or on an mlx-lm `lr_schedule` config."""
    lr = build_schedule(lr_schedule) if lr_schedule else warmup_cosine(learning_rate, iters)
    return optim.Adam(learning_rate=lr, betas=list(ADAM_BETAS))


class ProgressReport(TrainingCallback):
    """One plain line per report: loss, it/s, tokens/s (trained canvas positions), peak
    memory. On a terminal mlx-lm's live table shows the same, so it prints nothing there
    (unless `print_fn` is given) and only keeps `history`."""

    def __init__(self, print_fn=None):
        quiet = print_fn is None and sys.stdout.isatty()
        self.print = (lambda *a, **k: None) if quiet else (print_fn or print)
        self.history = []

    def on_train_loss_report(self, info):
        self.history.append(info)
        self.print(
            f"Iter {info['iteration']}: train loss {info['train_loss']:.4f}, "
            f"lr {info['learning_rate']:.3e}, it/s {info['iterations_per_second']:.3f}, "
            f"tokens/s {info['tokens_per_second']:.1f}, peak mem {info['peak_memory']:.3f} GB",
            flush=True,
        )

    def on_val_loss_report(self, info):
        self.print(
            f"Iter {info['iteration']}: val loss {info['val_loss']:.4f}, "
            f"val took {info['val_time']:.2f}s",
            flush=True,
        )


def train(
    model,
    train_set: Sequence[Example],
    valid_set: Sequence[Example],
    args: TrainingArgs,
    objective: Objective,
    optimizer,
    pad_id: int,
    seed: int = 0,
    callback: Optional[TrainingCallback] = None,
    pad_to: int = 32,
) -> None:
    """Train `model`'s trainable parameters; saves to `args.adapter_file`.

    Sequences are right-padded to a multiple of `pad_to` (fewer compiled shapes).
    """
    batches = BatchIterator(model, pad_id, objective, seed, pad_to)
    fit(model, optimizer, train_set, valid_set, args, make_loss(objective), batches, seed, callback)


def fit(model, optimizer, train_set, valid_set, args, loss, batches, seed=0, callback=None):
    """mlx-lm's training loop with a loss and batches of ours (`train`, distillation)."""
    if args.grad_checkpoint:
        # mlx-lm's checkpointing patches the layer class's __call__, which the training
        # forward does not use (and inference does); ours is in the objective.
        raise ValueError("Pass grad_checkpoint through the objective, not TrainingArgs.")
    mx.random.seed(seed)
    with _plain_progress_off_a_terminal():
        mlx_lm_train(
            model,
            optimizer,
            list(train_set),
            list(valid_set) or None,
            args=args,
            loss=loss,
            iterate_batches=batches,
            training_callback=callback,
        )


class _QuietUI:
    """Stands in for mlx-lm's `TrainUI` off a terminal: its rich console writes colour
    codes and a live table even into a log file; `ProgressReport` prints plain lines."""

    def __init__(self, total_iters: int, rank: int = 0):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self):
        pass

    def report_train(self, *args):
        pass

    @contextlib.contextmanager
    def val_task(self, total: int):
        yield lambda: None

    def report_val(self, *args):
        pass

    def report_save(self, checkpoint):
        print(f"Saved adapter weights to {checkpoint}.", flush=True)


@contextlib.contextmanager
def _plain_progress_off_a_terminal():
    """mlx-lm's live table on a terminal; plain lines (ProgressReport) otherwise."""
    if sys.stdout.isatty():
        yield
        return
    import mlx_lm.tuner.trainer as mlx_lm_trainer

    ui = mlx_lm_trainer.TrainUI
    mlx_lm_trainer.TrainUI = _QuietUI
    try:
        yield
    finally:
        mlx_lm_trainer.TrainUI = ui


def evaluate_loss(
    model, examples, batch_size, num_batches, objective, pad_id, max_seq_length, seed=0
):
    """Mean objective over `examples` with fixed draws (mlx-lm's `evaluate`)."""
    tic = time.perf_counter()
    loss = evaluate(
        model,
        list(examples),
        batch_size,
        num_batches,
        max_seq_length=max_seq_length,
        loss=make_loss(objective),
        iterate_batches=BatchIterator(model, pad_id, objective, seed),
    )
    return loss, time.perf_counter() - tic
