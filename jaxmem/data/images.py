"""Image files (PNG, JPEG, ...) decoded with Pillow into uint8 arrays, one rule for every source
that reads encoded images (Tiny ImageNet, `folder:`, `tfds:`).

Channels: a dataset whose images are all grayscale (Pillow modes 1, L, LA) gets 1 channel;
any other mix (RGB, RGBA, palette, CMYK, ...) is converted to RGB, dropping alpha, as
torchvision's default loader does. Sizes: every image must have the same size, or a size N is
given (CLI `--image-size`) and every image of another size is resized to N x N with Pillow's
antialiased bilinear filter (aspect ratio not kept; images already N x N are left untouched).
Each problem is one line that names the file.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxmem.errors import UserError

GRAY_MODES = frozenset({"1", "L", "LA"})
# 16-bit and float images would need a scaling rule of their own; refused, not guessed.
UNSUPPORTED_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
RESAMPLE = Image.Resampling.BILINEAR
DECODE_THREADS = 8  # Pillow releases the GIL while decoding
CHUNK = 256  # images per task of the thread pool
# Pillow's errors for a file that is not a readable image (DecompressionBombError is none of
# the others).
BAD_IMAGE = (UnidentifiedImageError, OSError, ValueError, SyntaxError,
             Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Header:
    """What an image file's header says: Pillow mode and (width, height)."""

    mode: str
    size: tuple[int, int]


def _open(source: bytes | str | os.PathLike) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def probe(source: bytes | str | os.PathLike, label: str) -> Header:
    """Read only the header of one image (bytes or a path); `label` names it in errors."""
    try:
        with _open(source) as image:
            header = Header(image.mode, image.size)
    except BAD_IMAGE as error:
        raise UserError(f"{label} is not a readable image ({error})") from error
    if header.mode in UNSUPPORTED_MODES:
        raise UserError(f"{label} is a 16-bit or floating-point image (mode {header.mode}); "
                        f"convert it to 8-bit")
    return header


def channels_of(headers: Sequence[Header]) -> int:
    """1 if every image is grayscale, else 3 (RGB)."""
    return 1 if all(h.mode in GRAY_MODES for h in headers) else 3


def common_size(headers: Sequence[Header], labels: Sequence[str], image_size: int | None,
                where: str) -> tuple[int, int]:
    """(height, width) of the decoded images: `image_size` squared, or the one size they share.

    Images of different sizes without `image_size` are an error naming two of them.
    """
    if image_size is not None:
        return image_size, image_size
    first = headers[0].size
    for header, label in zip(headers, labels, strict=True):
        if header.size != first:
            raise UserError(
                f"{where}: images differ in size: {labels[0]} is {first[0]}x{first[1]} but "
                f"{label} is {header.size[0]}x{header.size[1]}; give --image-size N to resize "
                f"every image to NxN (bilinear)")
    return first[1], first[0]


def decode(source: bytes | str | os.PathLike, label: str, channels: int, size: tuple[int, int],
           resize: bool = False) -> np.ndarray:
    """One image -> [H, W, channels] uint8 of `size` (height, width): resized to it if `resize`,
    else an image of another size is an error."""
    try:
        with _open(source) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
            if image.size != (size[1], size[0]):
                if not resize:
                    raise UserError(f"{label} is {image.size[0]}x{image.size[1]}, expected "
                                    f"{size[1]}x{size[0]}")
                image = image.resize((size[1], size[0]), RESAMPLE)
            pixels = np.asarray(image, np.uint8)
    except BAD_IMAGE as error:
        raise UserError(f"{label} is not a readable image ({error})") from error
    return pixels[..., None] if channels == 1 else pixels


def fill(out: np.ndarray, load: Callable[[int], np.ndarray], threads: int | None = None) -> None:
    """out[i] = load(i) for every i, in parallel threads (`threads=1`: in this thread)."""
    count = len(out)

    def fill_chunk(start: int) -> None:
        for i in range(start, min(start + CHUNK, count)):
            out[i] = load(i)

    starts = range(0, count, CHUNK)
    if threads is None:
        threads = max(1, min(DECODE_THREADS, os.cpu_count() or 1))
    if threads == 1:
        for start in starts:
            fill_chunk(start)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fill_chunk, starts):
            pass  # re-raises the first error


def probe_all(paths: Sequence[Path], labels: Sequence[str]) -> list[Header]:
    """Headers of many image files, read in parallel threads."""
    threads = max(1, min(DECODE_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(probe, paths, labels))
