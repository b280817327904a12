"""Small pictures for the kernel page: heat maps over images and filter grids, as PNG data URIs.

Everything is plain NumPy and a minimal PNG writer (zlib), so a page renders the same anywhere
and needs no imaging library. Pictures are stored at their own resolution (one pixel per
activation or weight) and enlarged by the browser, so a 32-kernel layer with 8 images stays a
few hundred kilobytes.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

# Colour stops of the heat map (dark for no activation, bright for the strongest), and of the
# signed maps used for weights and for activations that go negative (blue < 0 < red).
_HEAT = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
     [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)  # fmt: skip
_SIGNED = np.array([[33, 102, 172], [247, 247, 247], [178, 24, 43]], dtype=np.float64)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encodes an (H, W, 3) uint8 image as PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"png_bytes needs an (H, W, 3) uint8 image, got shape {rgb.shape}.")
    height, width, _ = rgb.shape
    # Each row starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


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


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of the two leading axes (a map onto its image's grid)."""
    rows = np.minimum((np.arange(height) * array.shape[0]) // height, array.shape[0] - 1)
    cols = np.minimum((np.arange(width) * array.shape[1]) // width, array.shape[1] - 1)
    return array[rows][:, cols]


def display_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The size a picture is stored at: at most `max_side` pixels on its longer side."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def heat_strip(maps: np.ndarray, scale: float, *, signed: bool, gap: int = 1) -> np.ndarray:
    """One kernel's maps over the images, side by side, as one uint8 RGB strip.

    Stored at the maps' own resolution; the page enlarges it (pixelated), which keeps the file
    small.

    Args:
      maps: (N, h, w) activation maps of one kernel.
      scale: the activation shown at full colour (the kernel's peak, or the layer's).
      signed: colour negative values blue and positive red (else dark-to-bright heat).
      gap: white pixels between maps.

    Returns:
      uint8 (h, N * (w + gap) - gap, 3).
    """
    count, height, width = maps.shape
    values = maps / (scale if scale > 0 else 1.0)
    colours = colormap(0.5 + 0.5 * values, _SIGNED) if signed else colormap(values, _HEAT)
    strip = np.full((height, count * (width + gap) - gap, 3), 255.0)
    for i in range(count):
        strip[:, i * (width + gap) : i * (width + gap) + width] = colours[i]
    return np.clip(np.rint(strip), 0, 255).astype(np.uint8)


def image_strip(images_rgb: np.ndarray, gap: int = 1) -> np.ndarray:
    """Images in [0, 1] side by side, laid out like `heat_strip` (same tiles and gaps)."""
    count, height, width, _ = images_rgb.shape
    strip = np.full((height, count * (width + gap) - gap, 3), 255.0)
    for i in range(count):
        strip[:, i * (width + gap) : i * (width + gap) + width] = images_rgb[i] * 255.0
    return np.clip(np.rint(strip), 0, 255).astype(np.uint8)


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
