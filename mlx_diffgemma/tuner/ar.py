"""Greedy next-token decoding by the model's own causal encoder: the AR baseline.

The encoder is trained with a next-token loss over prompt + answer, so the same weights
can also write the answer left to right. Decoding here re-runs the training forward over
the whole sequence for every token (no cache): meant for small evaluation models.
"""

from typing import Optional, Sequence

import mlx.core as mx

from .forward import encoder_pass


def ar_generate(
    model,
    prompt: Sequence[int],
    max_tokens: int,
    eos_token_ids: Sequence[int] = (),
    fixed: Optional[Sequence[Optional[int]]] = None,
    allowed: Optional[Sequence[Optional[Sequence[int]]]] = None,
) -> list:
    """Greedy tokens after `prompt`.

    Args:
        fixed: per output position, a token forced there (None: the model picks).
        allowed: per output position, the tokens the argmax may pick (None: any).
        eos_token_ids: stop after emitting one of these.
    """
    seq = list(prompt)
    out = []
    for i in range(max_tokens):
        if fixed is not None and i < len(fixed) and fixed[i] is not None:
            token = int(fixed[i])
        else:
            _, logits = encoder_pass(model, mx.array([seq]))
            row = logits[0, -1]
            if allowed is not None and i < len(allowed) and allowed[i] is not None:
                ids = mx.array(list(allowed[i]))
                token = int(ids[mx.argmax(row[ids])].item())
            else:
                token = int(mx.argmax(row).item())
        out.append(token)
        seq.append(token)
        if token in eos_token_ids:
            break
    return out
