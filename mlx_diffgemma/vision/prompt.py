"""Images in a prompt: the image parts of chat messages, their placeholders, their encoding.

A chat message may hold image parts, `{"type": "image", "image": path | bytes | PIL image
| uint8 array}` (optionally `"max_soft_tokens"`: 70, 140, 280 (default), 560 or 1120).
The chat template writes one `<|image|>` per part; here each becomes
`<|image>` + n x `<|image|>` + `<image|>`, n the image's soft tokens, as transformers'
Gemma 4 processor expands it. The prompt is then encoded in chunks that never split a
run of image tokens, so every run is encoded in one call with its soft tokens and its
bidirectional mask: chunked prefill stays exact for image prompts.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .processing import DEFAULT_SOFT_TOKENS, ProcessedImage, preprocess_image


def user_message(text: str, images: Sequence[Any] = ()) -> Dict[str, Any]:
    """A user chat message: the images first (as parts), then the text.

    Args:
        text: the message text.
        images: file paths (or anything `image_processing.load_image` takes).

    Returns:
        `{"role": "user", "content": ...}`: a plain string without images.
    """
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def image_parts(messages: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The image parts of `messages`, in prompt order."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or not content:
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                if "image" not in part:
                    raise ValueError(
                        "An image part needs an 'image' key: a file path, the file's bytes, "
                        "a PIL image or a uint8 array."
                    )
                parts.append(part)
    return parts


def expand_placeholders(
    ids: Sequence[int], soft_tokens: Sequence[int], image_token_id: int, boi: int, eoi: int
) -> List[int]:
    """Replace the k-th `image_token_id` of `ids` with boi + soft_tokens[k] x image + eoi."""
    found = sum(1 for i in ids if i == image_token_id)
    if found != len(soft_tokens):
        raise ValueError(
            f"The prompt has {found} image placeholder(s) but {len(soft_tokens)} image(s) were "
            "given; the chat template writes one <|image|> per image part."
        )
    out, runs = [], iter(soft_tokens)
    for i in ids:
        out += [boi] + [i] * next(runs) + [eoi] if i == image_token_id else [i]
    return out


@dataclass
class PromptImages:
    """The images of one prompt, preprocessed, and where their tokens start.

    Attributes:
        images: the preprocessed images, in prompt order.
        start: index in the encoded ids before which no placeholder is expanded (the
            cached conversation's pending answer comes first).
    """

    images: List[ProcessedImage]
    start: int = 0

    @property
    def soft_tokens(self) -> int:
        return sum(im.num_soft_tokens for im in self.images)

    def features(self, model) -> mx.array:
        """All images' soft tokens in text space, concatenated: (soft_tokens, hidden)."""
        out = []
        for im in self.images:  # one tower pass at a time bounds the peak memory
            out.append(model.image_features(mx.array(im.pixel_values), mx.array(im.positions)))
            mx.eval(out[-1])
        return mx.concatenate(out)

    def prefill(self, model, ids: Sequence[int], cache: List[Any], step_size: int = 512):
        """Encode `ids` (one row) into `cache` in chunks that keep every image run whole."""
        ids = np.asarray(ids, dtype=np.int32)
        is_image = ids == model.args.image_token_id
        is_image[: self.start] = False
        features = self.features(model)
        done = 0
        for a, b in chunk_bounds(is_image, self.start, step_size):
            n = int(is_image[a:b].sum())
            part = features[done : done + n] if n else None
            model.encode(mx.array(ids[None, a:b]), cache, image_features=part)
            mx.eval([c.state for c in cache])
            done += n


def chunk_bounds(is_image: np.ndarray, start: int, step: int) -> List[Tuple[int, int]]:
    """[a, b) chunks of at most `step` tokens, cut at `start`, that never cut an image run.

    A chunk that would end inside a run ends before it, or after it when the run starts
    the chunk (so a run longer than `step` is one chunk).
    """
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]])))
    runs = list(zip(edges[::2], edges[1::2]))
    bounds, a, n = [], 0, len(is_image)
    while a < n:
        b = min(a + step, n)
        if a < start:
            b = min(b, start)
        for r0, r1 in runs:
            if r0 < b < r1:
                b = r0 if r0 > a else r1
                break
        bounds.append((a, int(b)))
        a = int(b)
    return bounds


def _budget(part: Dict[str, Any]) -> int:
    return part.get("max_soft_tokens", DEFAULT_SOFT_TOKENS)


def prompt_images(
    model, prompt, pending: List[int], ids: List[int], offset: int, config
) -> Tuple[List[int], Optional[PromptImages]]:
    """The ids to encode, `pending + ids` with the image placeholders of `ids` expanded.

    Args:
        model: the model (its vision config and context length are used).
        prompt: the prompt as given to `stream_generate` (messages, text or ids); the
            images come from its image parts.
        pending: ids encoded before the prompt (a cached conversation's last answer).
        ids: the prompt's token ids as rendered (one `<|image|>` per image part).
        offset: tokens already in the cache.
        config: the call's `DiffusionConfig` (for the canvases' room in the context).

    Returns:
        (the ids to encode, `PromptImages` to encode them with, or None without images).

    Raises:
        ValueError: images for a text-only model, a placeholder count that does not
            match the images, an unreadable image, or more soft tokens than the context
            holds.
    """
    a = model.args
    is_messages = isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict)
    parts = image_parts(prompt) if is_messages else []
    if not parts:
        # (getattr: a stand-in model without image ids takes text alone)
        if getattr(a, "image_token_id", None) in ids:
            raise ValueError(
                "The prompt holds image placeholders (<|image|>) but no images; pass chat "
                'messages with {"type": "image", "image": ...} parts.'
            )
        return list(pending) + ids, None
    if not model.has_vision:
        raise ValueError(
            "This model folder has no vision tower (a text-only conversion), so it cannot "
            "take images; convert the original checkpoint again, or send text only."
        )
    vc = model.model.encoder.vision_tower.config
    sizes = [
        preprocess_image(p["image"], _budget(p), vc.patch_size, vc.pooling_kernel_size)
        for p in parts
    ]
    expanded = expand_placeholders(
        ids, [s.num_soft_tokens for s in sizes], a.image_token_id, a.boi_token_id, a.eoi_token_id
    )
    C = a.canvas_length
    expanded = list(pending) + expanded
    room = a.max_position_embeddings - offset - math.ceil(config.max_new_tokens / C) * C
    if len(expanded) > room:
        soft = sum(s.num_soft_tokens for s in sizes)
        raise ValueError(
            f"The {len(sizes)} image(s) take {soft} soft tokens; with the text that makes "
            f"{len(expanded)} prompt tokens, more than the {max(room, 0)} the context "
            f"({a.max_position_embeddings}) leaves after the cache and the canvases; use "
            'fewer or smaller images ("max_soft_tokens": 70 or 140) or lower max_tokens.'
        )
    return expanded, PromptImages(sizes, len(pending))
