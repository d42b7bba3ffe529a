"""Images: parity with transformers (fp32) for preprocessing, the vision tower, the encoder
cache after an image prompt and the denoise logits after it.

`python -m pytest -s -q tests/test_vision.py` prints the measured figures.
"""

import io

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers.models.diffusion_gemma")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402
from hf_reference import (  # noqa: E402
    HFDenoiser,
    _rewrite_config_json,
    config_from_dict,
    load_hf,
    randomize_tiny_model,
    tiny_config,
)
from PIL import Image  # noqa: E402
from transformers import DiffusionGemmaForBlockDiffusion  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.gemma4 import image_processing_pil_gemma4 as hf_proc  # noqa: E402

from mlx_diffgemma import load_model  # noqa: E402
from mlx_diffgemma.cache import SlidingWindowCache  # noqa: E402
from mlx_diffgemma.vision.processing import (  # noqa: E402
    aspect_ratio_preserving_size,
    preprocess_image,
)
from mlx_diffgemma.vision.prompt import PromptImages  # noqa: E402

TOL = 1e-3  # logits, as tests/test_parity_hf.py
KV_TOL = 1e-4
# The tiny text vocabulary is 512, so the image ids move below it.
IMAGE, BOI, EOI = 500, 501, 502
PATCH, POOL, BUDGET = 4, 3, 70


def hf_processor(patch=16, budget=280):
    return hf_proc.Gemma4ImageProcessorPil(
        patch_size=patch, max_soft_tokens=budget, pooling_kernel_size=POOL
    )


def noise(h, w, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


# --------------------------------------------------------------------------- preprocessing


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rotated_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(noise(40, 90, seed=3)).save(path, exif=exif)
    return path


def image_cases(tmp_path):
    """(name, what we pass, what transformers' processor gets) for each kind of input."""
    rgba = Image.fromarray(noise(50, 30, 4, seed=1), "RGBA")
    palette = Image.fromarray(noise(33, 47, 1, seed=2)).convert("P")
    palette.info["transparency"] = 7
    png = tmp_path / "rgba.png"
    rgba.save(png)
    jpeg = rotated_jpeg(tmp_path)
    return [
        ("upscaled array", noise(37, 61), noise(37, 61)),
        ("downscaled PIL", Image.fromarray(noise(700, 500, seed=4)), None),
        ("RGBA PIL on white", rgba, rgba),
        ("RGBA array on white", np.asarray(rgba), np.asarray(rgba)),
        ("grey PIL", Image.fromarray(noise(64, 64, 1, seed=5)), None),
        ("palette with transparency", palette, palette),
        # Paths go through transformers' load_image first (EXIF, plain RGB conversion).
        ("PNG path, alpha dropped", png, hf_load_image(str(png))),
        ("JPEG path, EXIF rotation", jpeg, hf_load_image(str(jpeg))),
        ("PNG bytes", png_bytes(rgba), hf_load_image(str(png))),
    ]


@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_preprocessing_matches_transformers(tmp_path, budget):
    proc = hf_processor(budget=budget)
    for name, ours_in, hf_in in image_cases(tmp_path):
        hf_in = ours_in if hf_in is None else hf_in
        ref = proc(images=[hf_in], return_tensors="np")
        got = preprocess_image(ours_in, budget)
        n = len(got.pixel_values)
        assert ref["num_soft_tokens_per_image"][0] == got.num_soft_tokens, name
        # Bit for bit: same resize (Pillow bicubic), same float64 rescale.
        assert np.array_equal(ref["pixel_values"][0][:n], got.pixel_values), name
        assert np.array_equal(ref["image_position_ids"][0][:n], got.positions), name
        assert (ref["image_position_ids"][0][n:] == -1).all(), name  # the rest is padding


def test_resize_rule_matches_transformers():
    sizes = [(1, 700), (10, 700), (10, 701), (17, 1190), (3, 100), (100, 3), (2, 100),
             (188, 384), (624, 1040), (1000, 1600), (3024, 4032), (16, 16), (804, 804),
             (13440, 48), (1, 1), (5, 5000)]  # fmt: skip
    for budget in (70, 280, 1120):
        for h, w in sizes:
            args = (h, w, 16, budget * 9, POOL)
            try:
                want = hf_proc.get_aspect_ratio_preserving_size(*args)
            except ValueError:
                with pytest.raises(ValueError):
                    aspect_ratio_preserving_size(*args)
                continue
            assert aspect_ratio_preserving_size(*args) == want, (h, w, budget)


def test_bad_images_raise_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cut = tmp_path / "cut.png"
    cut.write_bytes(png_bytes(Image.fromarray(noise(64, 64)))[:200])
    cases = [
        (tmp_path / "missing.png", "does not exist"),
        (text, "unsupported or unrecognised format"),
        (cut, "Cannot read image .*cut.png"),
        (b"GIF89a nonsense", "unsupported or unrecognised format"),
        (np.zeros((8, 8, 3), np.float32), "must be uint8"),
        (np.zeros((8, 8, 2), np.uint8), "must be uint8"),
        (42, "Unsupported image int"),
    ]
    for image, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            preprocess_image(image)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="max_soft_tokens=100 is not supported"):
        preprocess_image(noise(8, 8), 100)


# --------------------------------------------------------------------------- model parity


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny transformers DiffusionGemma with a random 1-layer vision tower, and ours."""
    cfg = tiny_config(vocab_size=512)
    cfg.update(image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI)
    cfg["vision_config"].update(num_hidden_layers=2, patch_size=PATCH)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(config_from_dict(cfg)).to(torch.float32).eval()
    randomize_tiny_model(model)
    with torch.no_grad():  # transformers' init leaves the tower near the identity
        tower = model.model.encoder.vision_tower
        for name, p in tower.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
        tower.patch_embedder.position_embedding_table.normal_(0.0, 0.5)
        tower.std_bias.normal_(0.0, 1.0)
        tower.std_scale.uniform_(0.5, 1.5)
        model.model.encoder.embed_vision.embedding_projection.weight.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("vision") / "ckpt"
    model.save_pretrained(path)
    _rewrite_config_json(path, "release", cfg)
    return load_hf(path), load_model(path)


IMAGES = [noise(24, 36, seed=10), noise(45, 30, seed=11)]


def processed():
    return [preprocess_image(im, BUDGET, PATCH, POOL) for im in IMAGES]


def hf_pixels():
    out = hf_processor(PATCH, BUDGET)(images=IMAGES, return_tensors="pt")
    return out["pixel_values"], out["image_position_ids"]


def report(name, ours, ref, tol):
    err = float(np.abs(np.asarray(ours) - ref).max())
    print(f"\n[vision parity] {name}: max|diff| = {err:.2e} (max|ref| = {np.abs(ref).max():.2f})")
    assert err <= tol, f"{name}: {err} > {tol}"


def test_vision_features_match_transformers(pair):
    hf, ours = pair
    pv, pos = hf_pixels()
    with torch.no_grad():
        ref = hf.model.encoder.get_image_features(pv, pos).pooler_output.numpy()
    got = PromptImages(processed()).features(ours)
    assert got.shape == ref.shape == (sum(p.num_soft_tokens for p in processed()), 64)
    report("projected soft tokens, 2 images", got, ref, KV_TOL)


def text(n, seed):
    return np.random.default_rng(seed).integers(3, 400, n).tolist()


def image_prompt(later_turn: bool):
    """Two images in one prompt, or one image after a long text history (a later turn)."""
    n = [p.num_soft_tokens for p in processed()]

    def run(k):
        return [BOI] + [IMAGE] * n[k] + [EOI]

    if later_turn:
        return [2] + text(30, 1) + text(12, 2) + run(0) + text(5, 3), 1
    return [2] + text(6, 1) + run(0) + text(4, 2) + run(1) + text(7, 3), 2


class HFImagePrefill(HFDenoiser):
    """`HFDenoiser` whose prompt is encoded with images, as `generate()` encodes it."""

    def __init__(self, model, prompt_ids, pixel_values, positions):
        self.model, self.batch_size = model, 1
        self.canvas_length = model.config.canvas_length
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        ids = torch.tensor([prompt_ids])
        P = ids.shape[1]
        pos = torch.arange(P, dtype=torch.int32)[None]
        enc_ids, masks = model._prepare_encoder_inputs(
            input_ids=ids,
            attention_mask=torch.ones((1, P), dtype=torch.bool),
            encoder_position_ids=pos,
            cache=self.cache,
            is_prefill=True,
            canvas_length=self.canvas_length,
            batch_size=1,
            mm_token_type_ids=(ids == IMAGE).long(),
        )
        with torch.no_grad():
            model.model.encoder(
                input_ids=enc_ids,
                pixel_values=pixel_values,
                image_position_ids=positions,
                attention_mask=masks,
                cache=self.cache,
                position_ids=pos,
            )
        self.length, self.tokens = P, ids


def mlx_prefill(ours, ids, n_images, step):
    cache = ours.make_cache()
    images = PromptImages(processed()[:n_images])
    if step is None:  # what a cached conversation does: history first, then the new turn
        cut = ids.index(BOI)
        ours.encode(mx.array([ids[:cut]]), cache)
        images.prefill(ours, ids[cut:], cache)
    else:
        images.prefill(ours, ids, cache, step_size=step)
    return cache


@pytest.mark.parametrize("later_turn", [False, True], ids=["two images", "later turn"])
@pytest.mark.parametrize("step", [512, 16, None], ids=["one chunk", "chunks of 16", "two calls"])
def test_image_prompt_cache_and_logits_match_transformers(pair, later_turn, step):
    hf, ours = pair
    ids, n_images = image_prompt(later_turn)
    pv, pos = hf_pixels()
    ref = HFImagePrefill(hf, ids, pv[:n_images], pos[:n_images])
    cache = mlx_prefill(ours, ids, n_images, step)
    where = f"{'later turn' if later_turn else 'two images'}, step {step}"
    for i, (r, c) in enumerate(zip(ref.cache_kv(), cache)):
        n = c.size() if isinstance(c, SlidingWindowCache) else c.offset
        for j, name in enumerate(("keys", "values")):
            report(f"{where}: layer {i} {name}", c.state[j][..., :n, :], r[name], KV_TOL)
    canvas = np.random.default_rng(4).integers(0, 512, (1, ours.args.canvas_length))
    first = ref.denoise(canvas)
    report(f"{where}: denoise logits", ours.denoise(mx.array(canvas), cache), first, TOL)
    sc = first / 0.7
    got = ours.denoise(mx.array(canvas), cache, self_conditioning_logits=mx.array(sc))
    report(f"{where}: self-conditioned logits", got, ref.denoise(canvas, sc), TOL)


def test_image_runs_are_bidirectional(pair):
    """The test above can fail: a causal-only encode of the same prompt misses by far."""
    hf, ours = pair
    ids, n_images = image_prompt(False)
    pv, pos = hf_pixels()
    canvas = np.random.default_rng(4).integers(0, 512, (1, ours.args.canvas_length))
    ref = HFImagePrefill(hf, ids, pv[:n_images], pos[:n_images]).denoise(canvas)
    ours.args.use_bidirectional_attention = None
    try:
        causal = ours.denoise(mx.array(canvas), mlx_prefill(ours, ids, n_images, 512))
    finally:
        ours.args.use_bidirectional_attention = "vision"
    assert float(np.abs(np.array(causal) - ref).max()) > 100 * TOL
