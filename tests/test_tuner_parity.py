"""The fine-tuning objective against a torch implementation on transformers' model (fp32).

transformers' forward has no loss; the reference objective below is written from its
outputs: the encoder's last hidden state (tied LM head, softcap) for the next-token loss
and the decoder logits for the diffusion loss, each example run separately through a
DynamicCache holding its prompt and clean preceding canvases, as `generate()` would.
The reference runs in float64 (the oracle; ours runs in fp32): torch's own fp32 run
differs from float64 by up to ~1e-4 relative on the small self-conditioning gradients,
ours by ~2e-5. torch's `padding_idx` rule (the pad row of an embedding gets no gradient
from being an input) is switched off: Google's JAX recipe has no such rule, nor does ours.
`python -m pytest -s -q tests/test_tuner_parity.py` prints the figures.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers.models.diffusion_gemma")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from hf_reference import build_hf_checkpoint, load_hf  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from mlx_diffgemma import load_model  # noqa: E402
from mlx_diffgemma.tuner.adapters import setup_full  # noqa: E402
from mlx_diffgemma.tuner.data import Example, make_batch  # noqa: E402
from mlx_diffgemma.tuner.losses import Draws, Objective, diffusion_loss  # noqa: E402

# Against transformers (the torch oracle): the full suite only (README: two tiers).
pytestmark = pytest.mark.slow

TOL = 1e-4
W_ENC = 0.7  # not 1, so a wrong weight shows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = build_hf_checkpoint(tmp_path_factory.mktemp("tuner_parity"), seed=3)
    hf = load_hf(path, "eager", "eager").to(torch.float64)
    for embed in (hf.model.decoder.embed_tokens, hf.model.encoder.language_model.embed_tokens):
        embed.padding_idx = None
    return hf, load_model(path)


def _examples(vocab, C):
    rng = np.random.default_rng(0)
    ids = lambda n: [int(i) for i in rng.integers(3, vocab, n)]  # noqa: E731
    # Prompts longer than the window (8); answers of 2 canvases (10 + EOS, 13 + EOS > 8).
    return [Example(ids(12), ids(10), 1), Example(ids(15), ids(13), 106)]


def _draws(C, vocab):
    rng = np.random.default_rng(1)
    return Draws(
        canvas=mx.array([1, 0], dtype=mx.int32),
        t=mx.array([0.35, 0.8]),
        keep_u=mx.array(rng.random((2, C)).astype(np.float32)),
        noise=mx.array(rng.integers(0, vocab, (2, C)).astype(np.int32)),
        self_cond=mx.array([True, False]),
    )


def _encode(hf, ids, cache):
    n = ids.shape[1]
    pos = torch.arange(n, dtype=torch.int32)[None]
    enc_ids, masks = hf._prepare_encoder_inputs(
        input_ids=ids,
        attention_mask=torch.ones((1, n), dtype=torch.bool),
        encoder_position_ids=pos,
        cache=cache,
        is_prefill=True,
        canvas_length=hf.config.canvas_length,
        batch_size=1,
    )
    return hf.model.encoder(input_ids=enc_ids, attention_mask=masks, cache=cache, position_ids=pos)


def _decode(hf, canvas, cache, start, sc_logits=None, sc_mask=None):
    C = canvas.shape[1]
    masks = hf.model.decoder.create_diffusion_decoder_attention_mask(
        config=hf.config,
        inputs_embeds=canvas.unsqueeze(-1),
        cache=cache,
        decoder_attention_mask=torch.ones((1, start + C), dtype=torch.bool),
    )
    return hf(
        decoder_input_ids=canvas,
        cache=cache,
        decoder_attention_mask=masks,
        decoder_position_ids=torch.arange(start, start + C)[None],
        self_conditioning_logits=sc_logits,
        self_conditioning_mask=sc_mask,
    ).logits


def torch_objective(hf, batch, draws):
    """The objective written on transformers' outputs, one example at a time."""
    text = hf.config.text_config
    C, cap = hf.config.canvas_length, text.final_logit_softcapping
    tokens = torch.as_tensor(np.array(batch.tokens), dtype=torch.long)
    dec_sum, enc_sum, enc_n = 0.0, 0.0, 0
    for b in range(tokens.shape[0]):
        P, L, k = int(batch.prompt_len[b]), int(batch.seq_len[b]), int(draws.canvas[b])
        full = tokens[b : b + 1, :L]
        h = _encode(hf, full, DynamicCache(config=text)).last_hidden_state
        logits = torch.tanh(hf.lm_head(h) / cap) * cap
        enc_sum = enc_sum + torch.nn.functional.cross_entropy(
            logits[0, :-1], full[0, 1:], reduction="sum"
        )
        enc_n += L - 1
        start = P + k * C
        cache = DynamicCache(config=text)
        _encode(hf, tokens[b : b + 1, :start], cache)  # prompt + clean canvases 0..k-1
        clean = tokens[b : b + 1, start : start + C]
        keep = torch.as_tensor(np.array(draws.keep_u[b : b + 1] >= draws.t[b]))
        noisy = torch.where(keep, clean, torch.as_tensor(np.array(draws.noise[b : b + 1])).long())
        with torch.no_grad():
            first = _decode(hf, noisy, cache, start)
        sc_mask = torch.tensor([bool(draws.self_cond[b])])
        second = _decode(hf, noisy, cache, start, first, sc_mask)
        dec_sum = dec_sum + torch.nn.functional.cross_entropy(second[0], clean[0], reduction="sum")
    return dec_sum / (tokens.shape[0] * C) + W_ENC * enc_sum / enc_n


@pytest.mark.parametrize("dense", [True, False], ids=["dense-experts", "sorted-experts"])
def test_loss_and_gradients_match_transformers(models, dense):
    hf, ours = models
    C, V = ours.args.canvas_length, ours.args.vocab_size
    for layer in ours.layers:
        layer.experts.dense = dense
    batch = make_batch(_examples(V, C), C, pad_id=0)
    draws = _draws(C, V)
    obj = Objective(self_conditioning_prob=0.5, encoder_loss_weight=W_ENC)

    setup_full(ours, num_layers=-1)
    loss_and_grad = nn.value_and_grad(ours, lambda m: diffusion_loss(m, batch, draws, obj)[0])
    loss, grads = loss_and_grad(ours)
    grads = dict(tree_flatten(grads))

    hf.zero_grad()
    ref = torch_objective(hf, batch, draws)
    ref.backward()
    params = dict(hf.named_parameters(remove_duplicate=False))
    loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
    worst, worst_name = 0.0, None
    assert len(grads) > 0
    for name, g in grads.items():
        hf_name = name[: -len(".weight")] if ".experts." in name else name
        r = params[hf_name].grad
        assert r is not None, f"{name}: no gradient in the reference"
        r = r.numpy().astype(np.float32)
        err = float(np.abs(np.array(g) - r).max() / max(np.abs(r).max(), 1e-12))
        if err > worst:
            worst, worst_name = err, name
    print(
        f"\n[tuner parity, {'dense' if dense else 'sorted'} experts] loss {loss.item():.6f} vs "
        f"{ref.item():.6f} (rel {loss_err:.1e}); {len(grads)} gradient tensors, worst "
        f"max|d|/max|g| {worst:.1e} ({worst_name})"
    )
    assert loss_err <= TOL
    assert worst <= TOL, f"{worst_name}: relative gradient error {worst}"
    for layer in ours.layers:
        layer.experts.dense = None


def test_peft_adapter_matches_transformers_with_peft(tmp_path):
    """A PEFT LoRA adapter made by peft on transformers' model gives the same logits here."""
    peft = pytest.importorskip("peft")
    from hf_reference import HFDenoiser, scenario_prompt

    path = build_hf_checkpoint(tmp_path / "base", seed=4)
    hf = load_hf(path)
    # Text modules only (a regex: the vision tower has q_proj etc. too).
    targets = (
        r".*(decoder|language_model)\.layers\.\d+\.(self_attn\.(q_proj|k_proj|o_proj)"
        r"|mlp\.(gate_proj|up_proj|down_proj)|router\.proj)"
        r"|.*self_conditioning\.(gate_proj|up_proj|down_proj)"
    )
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    modules = dict(peft_model.named_modules())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, module in modules.items():
            if name.endswith(".lora_B.default"):
                module.weight.normal_(0.0, 0.1)
        # transformers keeps encoder modules tied to the decoder's weights; peft adapts
        # each copy separately, and this port runs one set: give both the same adapter.
        for name, module in modules.items():
            if ".encoder.language_model.layers." in name and name.endswith(
                (".lora_A.default", ".lora_B.default")
            ):
                twin = modules[name.replace("encoder.language_model.", "decoder.")]
                module.weight.copy_(twin.weight)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    ours = load_model(path, adapter_path=str(tmp_path / "adapter"))
    prompt = scenario_prompt(length=20, seed=0)
    canvas = np.random.default_rng(1).integers(0, ours.args.vocab_size, (1, 8))
    ref = HFDenoiser(peft_model.base_model.model, prompt).denoise(canvas)
    cache = ours.make_cache()
    ours.encode(mx.array(prompt), cache)
    got = np.array(ours.denoise(mx.array(canvas), cache))
    plain = HFDenoiser(load_hf(path), prompt).denoise(canvas)
    err = float(np.abs(got - ref).max())
    print(
        f"\n[peft] max|dlogit| vs transformers+peft {err:.1e} (adapter moves logits by "
        f"{np.abs(ref - plain).max():.1f})"
    )
    assert np.abs(ref - plain).max() > 0.1
    assert err < 5e-3  # fp32 rounding on logits up to 30 (the plain forward: ~1e-3)
