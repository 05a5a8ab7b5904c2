"""PNG / JPEG / TIFF images (8- and 16-bit grey; colour reduced to luminance); the first page
of a multi-page TIFF."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from embedstore.errors import CORRUPT_STREAM, NOT_IMAGE, TRUNCATED, InputError
from embedstore.sources.records import SliceItem

GREY_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "F"}


def raster_item(path: str) -> SliceItem:
    return SliceItem(item_id=f"file:{path}", path=path, study_uid=f"file:{path}", series_uid=f"file:{path}",
                     slice_index=0)


def read_raster(path: str) -> np.ndarray:
    """The image as (1, rows, cols) float32 in its stored value range."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in GREY_MODES:
                image = image.convert("L")
            pixels = np.asarray(image, dtype=np.float32)
    except UnidentifiedImageError as error:
        raise InputError(NOT_IMAGE, f"not a readable image: {error}", stage="decode") from None
    except (OSError, SyntaxError, ValueError) as error:
        truncated = "truncated" in str(error).lower() or isinstance(error, (EOFError,))
        raise InputError(TRUNCATED if truncated else CORRUPT_STREAM, f"image cannot be decoded: {error}",
                         stage="decode") from None
    return pixels[None]
