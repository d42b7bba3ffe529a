"""The exact dense-experts path for models with few experts.

Every expert runs on every row and the router's weights, zero outside each row's top-k,
combine them. The result is the sorted `gather_mm` path's up to fp32 summation order
(the unselected experts add exact zeros, and get exactly zero gradient).

When it pays off (CPU, OpenBLAS preloaded, 1 thread, 4 experts top-2, expert width =
hidden; expert forward + backward): on the CPU `gather_mm` has no BLAS kernel, while the
dense path is one GEMM per projection, but it also runs the GeGLU on E instead of K
experts per row, and at small widths that element-wise work dominates: 4,000 rows at
width 128: dense 224 ms vs sorted 140 ms; 1,000 rows at width 512: dense 289 ms vs
sorted 363 ms. So it is chosen automatically only on the CPU, for E <= 4 K, and for
expert matrices of at least 512 x 512 (`benchmarks/train_speed.py` measures a toy).
"""

import mlx.core as mx
from mlx_lm.models.gemma4_text import geglu
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.lora import LoRASwitchLinear

# Dense costs E/K times the selected experts' FLOPs; allow at most this factor.
MAX_DENSE_RATIO = 4
# Below this expert matrix size (hidden x expert width) the GeGLU over every expert costs
# more than BLAS saves (module docstring).
MIN_DENSE_SIZE = 512 * 512


def _supported(layer) -> bool:
    if isinstance(layer, LoRASwitchLinear):
        return _supported(layer.linear)
    if isinstance(layer, QuantizedSwitchLinear):
        return getattr(layer, "global_scale", None) is None
    return isinstance(layer, SwitchLinear)


def use_dense(experts, top_k: int) -> bool:
    """Whether `experts` (gate_up_proj/down_proj switch layers) should run densely."""
    if mx.default_device() != mx.cpu:
        return False
    if not all(_supported(m) for m in (experts.gate_up_proj, experts.down_proj)):
        return False
    down = experts.down_proj
    down = down.linear if isinstance(down, LoRASwitchLinear) else down
    if down.input_dims * down.output_dims < MIN_DENSE_SIZE:
        return False
    return down.num_experts <= MAX_DENSE_RATIO * top_k


def per_expert(layer, h: mx.array) -> mx.array:
    """h (E, N, I) -> (E, N, O): expert e's projection of its own rows h[e]."""
    if isinstance(layer, LoRASwitchLinear):
        y = per_expert(layer.linear, h)
        z = (layer.dropout(h) @ layer.lora_a.swapaxes(-1, -2)) @ layer.lora_b.swapaxes(-1, -2)
        return y + (layer.scale * z).astype(h.dtype)
    if isinstance(layer, QuantizedSwitchLinear):
        biases = layer.get("biases")
        y = mx.stack(
            [
                mx.quantized_matmul(
                    h[e],
                    layer.weight[e],
                    layer.scales[e],
                    None if biases is None else biases[e],
                    transpose=True,
                    group_size=layer.group_size,
                    bits=layer.bits,
                    mode=layer.mode,
                )
                for e in range(layer.num_experts)
            ]
        )
    else:
        y = h @ layer.weight.swapaxes(-1, -2)
    if "bias" in layer:
        y = y + layer.bias[:, None, :]
    return y


def dense_experts(experts, x: mx.array, inds: mx.array, weights: mx.array) -> mx.array:
    """GeGLU experts over all experts: x (N, D), inds/weights (N, K) -> (N, D)."""
    n = experts.gate_up_proj.num_experts
    h = mx.broadcast_to(x[None], (n, *x.shape))
    gate, up = mx.split(per_expert(experts.gate_up_proj, h), 2, axis=-1)
    y = per_expert(experts.down_proj, geglu(gate, up))  # (E, N, D)
    # The router's weights on all experts: zero where an expert is not in the row's top-k.
    onehot = inds[..., None] == mx.arange(n)
    dense = (weights[..., None] * onehot).sum(axis=-2)  # (N, E), fp32
    return (y.transpose(1, 0, 2) * dense[..., None]).sum(axis=-2).astype(y.dtype)
