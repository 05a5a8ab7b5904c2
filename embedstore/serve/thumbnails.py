"""Thumbnails: a stored slice as its model saw it (the stored intensity mapping: CT window, MR
percentiles, VOI; MONOCHROME1 inverted), 256 px on the long side, as PNG. Rendered once and kept on
disk in the service's cache folder beside the store; the file name hashes the key and the mapping,
so it reveals neither and a model with another mapping gets its own picture."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from embedstore.inference.readback import read_unit_slice
from embedstore.intensity import IntensityConfig

THUMBNAIL_SIZE = 256  # px on the long side


def render_thumbnail(item: dict, intensity: IntensityConfig, size: int = THUMBNAIL_SIZE) -> bytes:
    """PNG bytes of one stored row's slice (item: key, path, frame, study_uid, series_uid,
    slice_index, modality, body_part): grey, or RGB for a multi-window CT input."""
    unit = read_unit_slice(item, intensity)  # (C, H, W) in [0, 1]
    height, width = unit.shape[1:]
    scale = size / max(height, width)
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    if target != (height, width):
        tensor = torch.from_numpy(np.ascontiguousarray(unit))[None]
        unit = F.interpolate(tensor, size=target, mode="bilinear", antialias=True, align_corners=False)[0].numpy()
    pixels = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    image = Image.fromarray(pixels[0]) if len(pixels) == 1 else Image.fromarray(np.moveaxis(pixels, 0, -1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ThumbnailCache:
    """PNG files under `folder`, one per (key, intensity mapping), written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get(self, item: dict, intensity: IntensityConfig) -> bytes:
        digest = hashlib.sha256(f"{item['key']}\n{intensity}".encode()).hexdigest()[:32]
        path = self.folder / digest[:2] / f"{digest}.png"
        if path.exists():
            return path.read_bytes()
        data = render_thumbnail(item, intensity)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.{id(data)}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)  # two requests rendering the same slice both end with one whole file
        return data
