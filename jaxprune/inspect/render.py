"""Small pictures for the kernel page: heat maps over images and filter grids, as PNG data URIs.

Pictures are NumPy arrays encoded with Pillow. They are stored near their own resolution (an
activation map is stretched to its image's grid, a weight is one pixel) and enlarged by the
browser, so a 32-kernel layer with 8 images stays a few hundred kilobytes.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# Colour stops of the heat map (dark for no activation, bright for the strongest), and of the
# signed maps used for weights and for activations that go negative (blue < 0 < red).
_HEAT = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
     [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)  # fmt: skip
_SIGNED = np.array([[33, 102, 172], [247, 247, 247], [178, 24, 43]], dtype=np.float64)
# How strongly the overlay hides its image where the kernel is at its peak (0: not at all).
OVERLAY_OPACITY = 0.8


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encodes an (H, W, 3) uint8 image as PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"png_bytes needs an (H, W, 3) uint8 image, got shape {rgb.shape}.")
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_uri(rgb: np.ndarray) -> str:
    """An (H, W, 3) uint8 image as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def colormap(values: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB floats in [0, 255], interpolating linearly between `stops`."""
    t = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(stops) - 1)
    low = np.minimum(np.floor(t).astype(np.int64), len(stops) - 2)
    frac = (t - low)[..., None]
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def display_images(images: np.ndarray) -> np.ndarray:
    """Preprocessed NHWC images -> RGB floats in [0, 1], each stretched to its own range."""
    images = np.asarray(images, np.float64)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    elif images.shape[-1] != 3:
        images = np.repeat(images.mean(axis=-1, keepdims=True), 3, axis=-1)
    low = images.min(axis=(1, 2, 3), keepdims=True)
    span = images.max(axis=(1, 2, 3), keepdims=True) - low
    return (images - low) / np.where(span > 0, span, 1.0)


def display_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The size a picture is stored at: at most `max_side` pixels on its longer side."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def filter_grid(kernel: np.ndarray) -> np.ndarray:
    """One 3-D filter as a grid of its input-channel slices, blue < 0 < red, one pixel a weight.

    Args:
      kernel: (kh, kw, in_channels) weights of one kernel.

    Returns:
      uint8 RGB grid: ceil(sqrt(in)) columns of (kh, kw) tiles with one white pixel between.
    """
    kh, kw, inputs = kernel.shape
    columns = int(np.ceil(np.sqrt(inputs)))
    rows = int(np.ceil(inputs / columns))
    peak = float(np.max(np.abs(kernel))) or 1.0
    grid = np.full((rows * (kh + 1) - 1, columns * (kw + 1) - 1, 3), 255.0)
    colours = colormap(0.5 + 0.5 * kernel / peak, _SIGNED)
    for c in range(inputs):
        r, q = divmod(c, columns)
        grid[r * (kh + 1) : r * (kh + 1) + kh, q * (kw + 1) : q * (kw + 1) + kw] = colours[:, :, c]
    return np.clip(np.rint(grid), 0, 255).astype(np.uint8)


def enlargement(height: int, width: int, side: int) -> int:
    """The whole-number zoom that shows an (height, width) picture at about `side` pixels."""
    return max(1, side // max(height, width))


def resize_images(images_rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W, 3) images in [0, 1] resized to (height, width) (Lanczos), still in [0, 1]."""
    images_rgb = np.asarray(images_rgb, np.float64)
    if images_rgb.shape[1:3] == (height, width):
        return images_rgb
    as_bytes = np.clip(np.rint(images_rgb * 255.0), 0, 255).astype(np.uint8)
    resized = [
        np.asarray(Image.fromarray(im, "RGB").resize((width, height), Image.Resampling.LANCZOS))
        for im in as_bytes
    ]
    return np.stack(resized).astype(np.float64) / 255.0


def resize_smooth(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (N, h, w) maps to (N, height, width), pixel centres aligned.

    A 7x7 map over a 28x28 image becomes a smooth 28x28 field instead of 4x4 blocks, so where a
    kernel responds can be read against the image underneath.
    """
    maps = np.asarray(maps, np.float32)
    if maps.shape[1:] == (height, width):
        return maps
    return np.stack(
        [
            np.asarray(Image.fromarray(m, "F").resize((width, height), Image.Resampling.BILINEAR))
            for m in maps
        ]
    )


def overlay_tiles(
    images_rgb: np.ndarray, maps: np.ndarray, scale: float, *, signed: bool
) -> np.ndarray:
    """One kernel's maps laid over its images: each image in grey, the map in colour on top.

    The map is stretched over the whole image (bilinear) and its colour is mixed in by its
    strength, so where the kernel is silent the image shows through unchanged.

    Args:
      images_rgb: (N, H, W, 3) images in [0, 1] (`display_images`), at the tiles' size.
      maps: (N, h, w) activation maps of one kernel, any h, w.
      scale: the activation shown at full colour (the kernel's peak).
      signed: colour negative values blue and positive red (else the dark-to-bright heat).

    Returns:
      uint8 (N, H, W, 3).
    """
    count, height, width, _ = images_rgb.shape
    values = resize_smooth(maps, height, width) / (scale if scale > 0 else 1.0)
    grey = images_rgb @ np.array([0.299, 0.587, 0.114])
    base = np.repeat(grey[..., None], 3, axis=-1) * 255.0
    if signed:
        colours = colormap(0.5 + 0.5 * values, _SIGNED)
        strength = np.abs(values)
    else:
        colours = colormap(values, _HEAT)
        strength = values
    alpha = OVERLAY_OPACITY * np.sqrt(np.clip(np.nan_to_num(strength), 0.0, 1.0))[..., None]
    mixed = base * (1.0 - alpha) + colours * alpha
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def mosaic(tiles: np.ndarray, columns: int, gap: int = 1) -> np.ndarray:
    """(N, H, W, 3) uint8 tiles in rows of `columns`, white `gap` pixels between them.

    Returns:
      uint8 (rows * (H + gap) - gap, columns * (W + gap) - gap, 3), row-major order.
    """
    count, height, width, _ = tiles.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    out = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for i in range(count):
        r, c = divmod(i, columns)
        top, left = r * (height + gap), c * (width + gap)
        out[top : top + height, left : left + width] = tiles[i]
    return out
