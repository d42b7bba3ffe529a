"""Image prompts end to end with the real Gemma 4 tokenizer: template placeholders,
their expansion, generation, a cached conversation, and the one-line errors."""

import base64
import io
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_CONFIG, TINY_GENERATION_CONFIG
from hf_reference import VISION_CONFIG
from mlx.utils import tree_flatten
from PIL import Image
from tokenizer_fixture import gemma4_spm_path

from mlx_diffgemma import PromptCache, load, stream_generate
from mlx_diffgemma.cache import cached_kv
from mlx_diffgemma.model import Model, ModelArgs
from mlx_diffgemma.tokenizer import Tokenizer
from mlx_diffgemma.vision.processing import preprocess_image
from mlx_diffgemma.vision.prompt import (
    PromptImages,
    chunk_bounds,
    expand_placeholders,
    user_message,
)

IMAGE, BOI, EOI = 258880, 255999, 258882

# The message-content loop of the Gemma 4 chat template (google/gemma-4 and DiffusionGemma
# `chat_template.jinja`): each text part trimmed, one `<|image|>` per image part.
GEMMA4_CONTENT = """{{- bos_token -}}
{%- for message in messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<|turn>' + role + '\\n' -}}
{%- if message['content'] is string -%}{{- message['content'] | trim -}}
{%- else -%}{%- for item in message['content'] -%}
{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}
{%- elif item['type'] == 'image' -%}{{- '<|image|>' -}}
{%- endif -%}
{%- endfor -%}{%- endif -%}
{{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""


def picture(h=30, w=42, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    """The conftest tiny model with a tiny vision tower and bidirectional image runs."""
    config = json.loads(json.dumps(TINY_CONFIG))
    config["text_config"]["use_bidirectional_attention"] = "vision"
    config["vision_config"] = VISION_CONFIG
    mx.random.seed(1)
    model = Model(ModelArgs.from_dict(config))
    model.load_weights(
        [
            (k, mx.random.normal(v.shape) * 0.5 + (1.0 if "norm" in k or "scal" in k else 0.0))
            for k, v in tree_flatten(model.parameters())
        ]
    )
    path = tmp_path_factory.mktemp("vision") / "tiny"
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps(TINY_GENERATION_CONFIG))
    shutil.copyfile(gemma4_spm_path(), path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def vtiny(vision_checkpoint):
    return load(vision_checkpoint)


CHATS = [
    [user_message("What is this?", [picture()])],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": " Compare "},
                {"type": "image", "image": picture()},
                {"type": "text", "text": "and"},
                {"type": "image", "image": picture(seed=1)},
            ],
        },
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        user_message("And now?", [picture()]),
    ],
]


@pytest.mark.parametrize("chat", CHATS, ids=["image first", "two images", "later turn"])
def test_template_writes_placeholders_as_the_gemma4_template(tok, tmp_path, chat):
    shutil.copyfile(gemma4_spm_path(), tmp_path / "tokenizer.model")
    (tmp_path / "chat_template.jinja").write_text(GEMMA4_CONTENT)
    jinja = Tokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template(chat) == jinja.apply_chat_template(chat)
    n_images = sum(
        1 for m in chat if not isinstance(m["content"], str) for p in m["content"]
        if p["type"] == "image"
    )  # fmt: skip
    assert tok.apply_chat_template(chat).count(IMAGE) == n_images


def test_expanded_prompt_matches_the_checkpoint_processor(tok):
    # mlx-community/diffusiongemma-26B-A4B-it-4bit @ a7a81407 (its chat_template.jinja and
    # processor), as recorded in OpenJevSwift Fixtures/vision/preprocessing.json,
    # state_prompts "trim_empty": a 1040x624 image alone in the user turn gives 252 soft
    # tokens, and the turn reads <|turn>user\n<|image> 252 x <|image|> <image|><turn|>\n.
    image = preprocess_image(np.zeros((624, 1040, 3), np.uint8))
    assert image.num_soft_tokens == 252 and image.size == (576, 1008)
    ids = tok.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": 0}]}])
    expanded = expand_placeholders(ids, [252], IMAGE, BOI, EOI)
    assert expanded == [2, 105, 2364, 107, BOI] + [IMAGE] * 252 + [EOI, 106, 107, 105, 4368, 107]


def test_chunks_never_cut_an_image_run():
    is_image = np.zeros(40, bool)
    is_image[5:25] = True  # a run longer than a chunk
    is_image[30:33] = True
    assert chunk_bounds(is_image, 0, 8) == [(0, 5), (5, 25), (25, 33), (33, 40)]
    assert chunk_bounds(is_image, 3, 8) == [(0, 3), (3, 5), (5, 25), (25, 33), (33, 40)]
    assert chunk_bounds(is_image, 0, 6) == [(0, 5), (5, 25), (25, 30), (30, 36), (36, 40)]
    assert chunk_bounds(np.zeros(5, bool), 0, 512) == [(0, 5)]


def encoded(cache):
    return [np.array(t) for c in cache for t in cached_kv(c)]


def test_image_chat_generates_and_a_later_turn_encodes_as_one_pass(vtiny):
    model, tok = vtiny
    cache = PromptCache(model)
    first = list(stream_generate(model, tok, [{"role": "user", "content": "Hi"}],
                                 prompt_cache=cache, seed=0))  # fmt: skip
    assert first[-1].finish_reason is not None and IMAGE not in cache.tokens
    before = cache.offset
    pics = [picture(), picture(50, 20, seed=2)]
    content = [{"type": "image", "image": p, "max_soft_tokens": 140} for p in pics]
    turn = [{"role": "user", "content": content + [{"type": "text", "text": "And this?"}]}]
    last = list(stream_generate(model, tok, turn, prompt_cache=cache, seed=1))[-1]
    processed = [preprocess_image(p, 140, 4, 3) for p in pics]
    soft = [p.num_soft_tokens for p in processed]
    assert last.prompt_tokens == cache.offset - before
    new = cache.tokens[before:]
    start = new.index(BOI)
    runs = [BOI] + [IMAGE] * soft[0] + [EOI, BOI] + [IMAGE] * soft[1] + [EOI]
    assert new[start : start + len(runs)] == runs and new.count(IMAGE) == sum(soft)
    # The cache of the two calls (history, then the image turn in small chunks) equals
    # encoding the whole conversation at once.
    images = PromptImages(processed)
    fresh = model.make_cache()
    images.prefill(model, cache.tokens, fresh, step_size=4096)
    for a, b in zip(encoded(cache.layers), encoded(fresh)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_image_budget_is_per_part(vtiny):
    model, tok = vtiny
    part = {"type": "image", "image": picture(), "max_soft_tokens": 70}
    r = list(stream_generate(model, tok, [{"role": "user", "content": [part]}], seed=0))[-1]
    soft = preprocess_image(picture(), 70, 4, 3).num_soft_tokens
    assert soft < preprocess_image(picture(), 280, 4, 3).num_soft_tokens
    assert r.prompt_tokens == len(tok.apply_chat_template([user_message("", [0])])) + 1 + soft


def test_image_errors_are_one_line_and_leave_the_cache(vtiny, tiny, tmp_path):
    model, tok = vtiny
    bad = tmp_path / "bad.png"
    bad.write_text("no picture here")
    cases = [
        ([user_message("?", [tmp_path / "missing.jpg"])], {}, "missing.jpg does not exist"),
        ([user_message("?", [bad])], {}, "bad.png: unsupported or unrecognised format"),
        ([{"role": "user", "content": [{"type": "image"}]}], {}, "needs an 'image' key"),
        (
            [user_message("?", [picture()] * 2)],
            {"max_tokens": 8},
            "2 image.* take \\d+ soft tokens.*more than the .* the context \\(512\\)",
        ),
        ("What is <|image|>?", {}, "image placeholders \\(<\\|image\\|>\\) but no images"),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": picture(), "max_soft_tokens": 99}],
                }
            ],
            {},
            "max_soft_tokens=99 is not supported",
        ),  # fmt: skip
    ]
    cache = PromptCache(model)
    for prompt, kw, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            list(stream_generate(model, tok, prompt, prompt_cache=cache, **kw))
        assert "\n" not in str(e.value)
        assert len(cache) == 0 and all(c.empty() for c in cache.layers)
    text_model, text_tok = tiny
    with pytest.raises(ValueError, match="no vision tower"):
        list(stream_generate(text_model, text_tok, [user_message("?", [picture()])]))


def test_text_only_folder_with_a_vision_config_loads_text_only(vision_checkpoint, tmp_path):
    from mlx_diffgemma import load_model

    shutil.copytree(vision_checkpoint, tmp_path / "t")
    weights = mx.load(str(tmp_path / "t" / "model.safetensors"))
    text = {
        k: v for k, v in weights.items() if ".vision_tower." not in k and "embed_vision" not in k
    }
    mx.save_safetensors(str(tmp_path / "t" / "model.safetensors"), text)
    model = load_model(tmp_path / "t")
    assert not model.has_vision and model.args.vision_config is None


def test_pil_and_path_inputs_give_the_same_tokens(vtiny, tmp_path):
    model, _ = vtiny
    path = tmp_path / "p.png"
    Image.fromarray(picture()).save(path)
    a, b = (preprocess_image(x, 280, 4, 3) for x in (path, Image.open(path)))
    assert np.array_equal(a.pixel_values, b.pixel_values)
    fa, fb = (PromptImages([x]).features(model) for x in (a, b))
    assert mx.array_equal(fa, fb).item()


def test_quantized_tower_runs_close_to_float():
    """The uniform recipe quantizes the tower where groups divide (8-bit here)."""
    import mlx.nn as nn

    from mlx_diffgemma.vision.tower import make_vision

    config = {**VISION_CONFIG, "hidden_size": 64, "intermediate_size": 128, "head_dim": 32,
              "patch_size": 8}  # fmt: skip
    mx.random.seed(0)
    tower, embed = make_vision(config, 64)
    for m in (tower, embed):
        m.load_weights(
            [(k, mx.random.normal(v.shape) * 0.1) for k, v in tree_flatten(m.parameters())]
        )
    image = preprocess_image(picture(40, 56), 70, 8, 3)
    x, pos = mx.array(image.pixel_values), mx.array(image.positions)
    ref = embed(tower(x, pos))
    for m in (tower, embed):
        nn.quantize(m, group_size=64, bits=8)
    assert tower.patch_embedder.input_proj.bits == 8
    got = embed(tower(x, pos))
    assert got.dtype == mx.float32
    assert float(mx.abs(got - ref).max()) < 0.05 * float(mx.abs(ref).max())


def test_attention_query_blocks_change_nothing(vtiny, monkeypatch):
    import mlx_diffgemma.vision.tower as vision

    model, _ = vtiny
    image = PromptImages([preprocess_image(picture(), 280, 4, 3)])
    whole = image.features(model)
    monkeypatch.setattr(vision, "QUERY_BLOCK", 100)  # 2,394 patches: 24 blocks
    assert mx.array_equal(image.features(model), whole).item()


def test_release_vision_keys_and_shapes():
    """SPEC section 4.2: 355 vision tensors + 1 projector, with these shapes (lazy, no memory)."""
    from mlx_diffgemma.convert import build_lazy_model

    release = {
        "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72,
        "patch_size": 16, "pooling_kernel_size": 3, "position_embedding_size": 10240,
        "standardize": True,
    }  # fmt: skip
    model = build_lazy_model({"model_type": "diffusion_gemma", "vision_config": release})
    shapes = {
        k: tuple(v.shape)
        for k, v in tree_flatten(model.parameters())
        if ".vision_tower." in k or ".embed_vision." in k
    }
    assert len(shapes) == 356
    tower, layer = "model.encoder.vision_tower.", "model.encoder.vision_tower.encoder.layers.26."
    assert shapes[tower + "patch_embedder.input_proj.weight"] == (1152, 768)
    assert shapes[tower + "patch_embedder.position_embedding_table"] == (2, 10240, 1152)
    assert shapes[tower + "std_bias"] == shapes[tower + "std_scale"] == (1152,)
    assert shapes[layer + "self_attn.q_proj.linear.weight"] == (1152, 1152)
    assert shapes[layer + "self_attn.k_norm.weight"] == (72,)
    assert shapes[layer + "mlp.down_proj.linear.weight"] == (1152, 4304)
    assert shapes["model.encoder.embed_vision.embedding_projection.weight"] == (2816, 1152)
    assert sum(np.prod(s) for s in shapes.values()) == 572_794_416  # SPEC section 4.3


# The server: inline images only (issue 21).


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_server_takes_inline_images_and_refuses_the_rest(
    vision_checkpoint, tiny_checkpoint, tmp_path, vtiny
):
    import httpx
    from server_process import ServerProcess

    png = _png(picture())
    b64 = base64.b64encode(png).decode()
    srv = ServerProcess(vision_checkpoint, tmp_path / "vision.log")
    text_only = ServerProcess(tiny_checkpoint, tmp_path / "text.log")
    try:
        openai_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}
        chat = {
            "messages": [
                {"role": "user", "content": [openai_part, {"type": "text", "text": "What?"}]}
            ],
            "max_tokens": 8,
            "seed": 3,
        }
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        # The reply is the API's for the same image bytes and seed.
        model, tok = vtiny
        messages = [user_message("What?", [png])]
        api = "".join(x.text for x in stream_generate(model, tok, messages, max_tokens=8, seed=3))
        assert r.json()["choices"][0]["message"]["content"] == api
        block = {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": b64},
        }
        anthropic_body = {
            "messages": [{"role": "user", "content": [block, {"type": "text", "text": "What?"}]}],
            "max_tokens": 8,
            "seed": 3,
        }
        r = httpx.post(srv.url + "/v1/messages", json=anthropic_body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["content"][0]["text"] == api

        def refused(url, part, word):
            body = {**chat, "messages": [{"role": "user", "content": [part]}]}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 400, r.text
            assert word in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages"

        # Nothing a request names is fetched or read: URLs and paths are refused.
        refused(
            srv.url,
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}},
            "fetches nothing",
        )
        refused(
            srv.url,
            {"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}},
            "fetches nothing",
        )
        refused(
            srv.url,
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
            "base64",
        )
        huge = _png(np.zeros((5000, 4000, 3), np.uint8))
        big = {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(huge).decode()},
        }
        refused(srv.url, big, "pixels")
        url_block = {
            **anthropic_body,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}],
                }
            ],
        }
        r = httpx.post(srv.url + "/v1/messages", json=url_block, timeout=60)
        assert r.status_code == 400 and "fetches nothing" in r.json()["error"]["message"]
        # A text-only checkpoint names itself, not the server.
        refused(
            text_only.url, openai_part, f"The model {tiny_checkpoint.name!r} has no vision tower"
        )
    finally:
        srv.stop()
        text_only.stop()
