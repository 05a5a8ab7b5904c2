"""Declared image sizes, checked from the header before any pixel is decoded.

A few kilobytes of compressed data can declare a 60000 x 60000 image, and decoders allocate what
the header declares before they read the data. So every frame (DICOM frame, NIfTI slice, raster
page) may hold at most `max_pixels` values (× samples for colour), and a file that is decoded
whole (DICOM, NIfTI) at most FILE_FRAMES frames' worth; anything larger is `too_large`.
"""

from __future__ import annotations

import math

from embedstore.errors import TOO_LARGE, InputError

DEFAULT_MAX_PIXELS = 2 ** 28  # 16384 x 16384 per frame: far above any radiograph (a mammogram is ~4096 x 3328)
# What `embedstore serve` accepts from an upload: a 249 KB PNG of 16000² costs 4.4 GB to embed, and the
# service embeds what strangers send; 2^25 still takes a 4096 x 5120 mammogram.
UPLOAD_MAX_PIXELS = 2 ** 25
# A file decoded whole may hold this many frames' worth of values: 2**31 by default, four times a
# 2,000-slice 512 x 512 CT, still a few GiB as float32.
FILE_FRAMES = 8


def check_declared_size(frame_shape: tuple[int, ...], n_frames: int, max_pixels: int,
                        whole_file: bool = True, stage: str = "read") -> None:
    """InputError(too_large) when a frame of `frame_shape` (rows, cols[, samples]) is over
    `max_pixels`, or, for a file decoded whole, its `n_frames` together are over FILE_FRAMES × that."""
    per_frame = math.prod(frame_shape)
    size = " x ".join(str(n) for n in frame_shape)
    if per_frame > max_pixels:
        raise InputError(TOO_LARGE, f"the header declares frames of {size} = {per_frame:,} values, over "
                         f"--max-pixels {max_pixels:,}", stage)
    if whole_file and per_frame * n_frames > FILE_FRAMES * max_pixels:
        raise InputError(TOO_LARGE, f"the header declares {n_frames:,} frames of {size}, {per_frame * n_frames:,} "
                         f"values decoded at once, over {FILE_FRAMES} x --max-pixels {max_pixels:,}", stage)
