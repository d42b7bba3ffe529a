"""The token-level generator: `generate_step` picks a loop once and yields its events.

Exact mode runs `loop.DenoisingLoop` (transformers' sampler); fast mode runs
`fast.fast_loop`'s. Everything above (the text stream, infill, structured output) sees
only the events `DenoiseStep` and `Block`.
"""

from typing import Any, Generator, List, Optional, Union

import mlx.core as mx

from . import sampler as S
from .canvas import CanvasLayout
from .config import DiffusionConfig
from .fast import fast_loop
from .loop import Block, DenoiseStep, DenoisingLoop, generation_stream, prefill

__all__ = ["Block", "DenoiseStep", "generate_step", "generation_stream", "make_loop", "prefill"]


def make_loop(model, config: DiffusionConfig, draws, accept: S.Accept, batch: int):
    """The denoising loop of `config`: transformers' (exact mode) or fast mode's."""
    if config.fast is None:
        return DenoisingLoop(model, config, draws, accept, batch)
    return fast_loop(model, config, draws, accept, batch)


def generate_step(
    prompt: mx.array,
    model,
    *,
    config: DiffusionConfig,
    cache: Optional[List[Any]] = None,
    key: Optional[mx.array] = None,
    draws: Optional[Any] = None,
    layout: Optional[CanvasLayout] = None,
    accept: Optional[S.Accept] = None,
    drafts: bool = False,
    prefill_step_size: int = 512,
) -> Generator[Union[DenoiseStep, Block], None, None]:
    """Generate canvases for `prompt` (B, L) token ids; yields `Block`s (and `DenoiseStep`s
    when `drafts`).

    Args:
        prompt: tokens not yet in `cache`.
        model: a `Model`.
        config: sampler settings.
        cache: from `model.make_cache()`, possibly holding earlier turns; a new one if None.
            On return it holds the prompt and every canvas but the last.
        key: `mx.random.key` for all random draws; or pass `draws` (an object with
            `initial_canvas(shape)`, `noise(shape)`, `sample(probs)`), e.g. to replay.
            Each canvas draws its random start even where a layout fixes or seeds it, so
            a layout changes no other draw.
        layout: fixed, seeded and token-limited output positions, shared by every row
            (see `CanvasLayout`); None for none.
        accept: the acceptance rule (see `sampler.Accept`); defaults to
            `sampler.make_accept(config)`, transformers' entropy bound.
        drafts: also yield every denoising step.
        prefill_step_size: prompt tokens encoded per chunk.

    Raises:
        ValueError: both or neither of key and draws, a prompt id outside the vocabulary,
            or a layout that does not fit the model or `config.max_new_tokens`.
    """
    if (key is None) == (draws is None):
        raise ValueError("Pass exactly one of key or draws.")
    if layout is not None:
        layout.check(model.args.vocab_size, config.max_new_tokens)
    draws = draws or S.RandomDraws(key, model.args.vocab_size)
    cache = model.make_cache() if cache is None else cache
    accept = accept or S.make_accept(config)
    loop = make_loop(model, config, draws, accept, prompt.shape[0])
    yield from loop.generate(prompt, cache, layout, drafts, prefill_step_size)
