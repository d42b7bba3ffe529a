"""Image preprocessing as transformers' Gemma 4 image processor (Pillow backend) does it.

An image is read (a path or encoded bytes as `transformers.image_utils.load_image`: EXIF
orientation applied, converted to RGB; a PIL image or array as the processor's
`convert_to_rgb`: transparency composited onto white), resized with bicubic resampling to
the largest size that keeps its aspect ratio, has sides divisible by
`pooling_kernel_size * patch_size` and gives at most `max_soft_tokens * pooling_kernel_size^2`
patches, rescaled to [0, 1] and cut into patches in row-major order with their (x, y)
positions. Only numpy and Pillow are used.
"""

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Tuple

import numpy as np

# The soft-token budgets the Gemma 4 processor accepts per image.
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280


@dataclass(frozen=True)
class ProcessedImage:
    """One image, ready for the vision tower.

    Attributes:
        pixel_values: (N, 3 * patch_size^2) float32 patches in [0, 1], each row-major
            over (row, column, channel) within the patch.
        positions: (N, 2) int32 (x, y) patch coordinates, row-major over the image.
        num_soft_tokens: N / pooling_kernel_size^2, the image's tokens in the prompt.
        size: (height, width) after resizing.
    """

    pixel_values: np.ndarray
    positions: np.ndarray
    num_soft_tokens: int
    size: Tuple[int, int]


def _describe(image: Any) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return f"the {type(image).__name__} image"


def _open(source, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(source)
        img.load()  # decode now, so a truncated file fails here with its name
    except UnidentifiedImageError:
        raise ValueError(
            f"Cannot read image {name}: unsupported or unrecognised format; pass a PNG, "
            "JPEG, WebP, GIF or another format Pillow decodes."
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"Cannot read image {name}: {e}; pass an intact image file.") from None
    return img


def _file_to_rgb(source, name: str):
    # transformers' load_image: EXIF orientation, then a plain RGB conversion.
    from PIL import ImageOps

    img = _open(source, name)
    return ImageOps.exif_transpose(img).convert("RGB")


def _pil_to_rgb(img):
    # The processor's convert_to_rgb: transparency is composited onto white.
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"Cannot use {name}: an image array must be uint8 with shape (H, W), (H, W, 3) or "
            f"(H, W, 4) (got {a.dtype} {a.shape}); convert it, e.g. (x * 255).astype(np.uint8)."
        )
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[..., 3:4] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return a


def load_image(image: Any) -> np.ndarray:
    """The image as an (H, W, 3) uint8 RGB array.

    Args:
        image: a file path (str or Path), the encoded file as bytes, a PIL image, or a
            uint8 array (H, W), (H, W, 3) or (H, W, 4).

    Raises:
        ValueError: the path does not exist, the file cannot be decoded (unreadable or
            unsupported format), an array has the wrong dtype or shape, or the input is of
            another type.
    """
    from PIL import Image

    name = _describe(image)
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise ValueError(f"Image file {path} does not exist; check the path.")
        rgb = _file_to_rgb(path, name)
    elif isinstance(image, (bytes, bytearray)):
        rgb = _file_to_rgb(io.BytesIO(image), "given as bytes")
    elif isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image)
    elif isinstance(image, np.ndarray):
        return _array_to_rgb(image, name)
    else:
        raise ValueError(
            f"Unsupported image {type(image).__name__}; pass a file path, the file's bytes, "
            "a PIL image or a uint8 numpy array."
        )
    if min(rgb.size) < 1:
        raise ValueError(f"Image {name} is empty ({rgb.size[0]}x{rgb.size[1]} pixels).")
    return np.asarray(rgb)


def aspect_ratio_preserving_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> Tuple[int, int]:
    """The resized (height, width): as transformers' `get_aspect_ratio_preserving_size`."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    h = int(math.floor(factor * height / side)) * side
    w = int(math.floor(factor * width / side)) * side
    if h == 0 and w == 0:
        raise ValueError(f"Cannot resize a {width}x{height} image to a 0x0 grid of patches.")
    longest = (max_patches // pooling_kernel_size**2) * side
    if h == 0:  # a very wide image: one row of cells
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        w, h = side, min(int(math.floor(height / width)) * side, longest)
    if h * w > target_px:
        raise ValueError(
            f"Resizing a {width}x{height} image to {w}x{h} exceeds {max_patches} patches."
        )
    return h, w


def patchify(image: np.ndarray, patch_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(H, W, C) -> patches (N, p * p * C) and (x, y) positions (N, 2), row-major."""
    H, W, C = image.shape
    hp, wp = H // patch_size, W // patch_size
    patches = image.reshape(hp, patch_size, wp, patch_size, C).transpose(0, 2, 1, 3, 4)
    grid_x, grid_y = np.meshgrid(np.arange(wp), np.arange(hp), indexing="xy")
    positions = np.stack([grid_x, grid_y], axis=-1).reshape(-1, 2).astype(np.int32)
    return patches.reshape(hp * wp, -1), positions


def preprocess_image(
    image: Any,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    patch_size: int = 16,
    pooling_kernel_size: int = 3,
) -> ProcessedImage:
    """Resize, rescale and patchify one image as the Gemma 4 processor does.

    Args:
        image: see `load_image`.
        max_soft_tokens: the image's token budget, one of 70, 140, 280, 560, 1120.
        patch_size: the vision tower's patch side in pixels.
        pooling_kernel_size: patches pooled per soft token, per side.

    Returns:
        The patches, their positions and the number of soft tokens.

    Raises:
        ValueError: an unreadable image or an unsupported budget.
    """
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(
            f"max_soft_tokens={max_soft_tokens!r} is not supported; use one of "
            f"{', '.join(map(str, SUPPORTED_SOFT_TOKENS))}."
        )
    from PIL import Image

    rgb = load_image(image)
    max_patches = max_soft_tokens * pooling_kernel_size**2
    h, w = aspect_ratio_preserving_size(
        rgb.shape[0], rgb.shape[1], patch_size, max_patches, pooling_kernel_size
    )
    if (h, w) != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), resample=Image.Resampling.BICUBIC))
    # As transformers' rescale: multiply in float64, then cast.
    pixels = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    patches, positions = patchify(pixels, patch_size)
    return ProcessedImage(patches, positions, len(patches) // pooling_kernel_size**2, (h, w))
