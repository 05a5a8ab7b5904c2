"""PNG / JPEG / TIFF images (8- and 16-bit grey; colour reduced to luminance). Every page of a
multi-page TIFF (every frame of an animated PNG) is a slice: one series per file, `slice_index` =
page. Page 0 keeps the id `file:<path>` a single image has; page n > 0 is `file:<path>#p<n>`.

Page sizes are read from the header before any pixel is decoded, and a page over `max_pixels`
values is `too_large`. Pillow's own decompression-bomb check is set to the same limit while
embedstore reads, so it neither refuses what `--max-pixels` allows nor turns a bomb into a
`decode_error`.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from embedstore.errors import CORRUPT_STREAM, NOT_IMAGE, TOO_LARGE, TRUNCATED, UNREADABLE, InputError
from embedstore.sources.limits import DEFAULT_MAX_PIXELS, check_declared_size
from embedstore.sources.records import ReadTask, SliceItem, in_native_order

GREY_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "F"}
# Pages are read one at a time: a long stack read in parts keeps a decode worker to a few pages.
PAGES_PER_TASK = 16


@dataclass
class RasterLayout:
    path: str
    page_sizes: list[tuple[int, int]]  # (rows, cols) of each page, from the header


def raster_item(path: str, page: int = 0, modality: str | None = None) -> SliceItem:
    file_id = f"file:{path}"
    return SliceItem(item_id=file_id if page == 0 else f"{file_id}#p{page}", path=path, study_uid=file_id,
                     series_uid=file_id, slice_index=page, frame=page, modality=modality, kind="raster")


def raster_layout(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> RasterLayout:
    """Every page's size, from the header alone; InputError for a page over `max_pixels`."""
    with _opened(path, max_pixels, "read") as image:
        sizes = []
        for page in range(getattr(image, "n_frames", 1)):
            image.seek(page)
            _check_page(image, max_pixels, "read")
            sizes.append((image.height, image.width))
    return RasterLayout(path, sizes)


def raster_tasks(layout: RasterLayout, modality: str | None = None) -> list[ReadTask]:
    """One item per page; runs of pages of one size are read together, PAGES_PER_TASK at most."""
    tasks: list[ReadTask] = []
    for page, size in enumerate(layout.page_sizes):
        item = raster_item(layout.path, page, modality)
        if tasks and layout.page_sizes[page - 1] == size and len(tasks[-1].items) < PAGES_PER_TASK:
            tasks[-1].items.append(item)
        else:
            tasks.append(ReadTask("raster", layout.path, [item]))
    return tasks


def read_raster(path: str, pages: list[int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The listed pages (of one size) as (n, rows, cols) values as stored (uint8 for 8-bit grey or
    colour reduced to grey, 16 or 32-bit integers, float32)."""
    with _opened(path, max_pixels, "decode") as image:
        return in_native_order(np.stack([_page_pixels(image, page, max_pixels) for page in pages]))


def _page_pixels(image: Image.Image, page: int, max_pixels: int) -> np.ndarray:
    image.seek(page)
    _check_page(image, max_pixels, "decode")
    image.load()
    if image.mode not in GREY_MODES:
        image = image.convert("L")
    return np.asarray(image)


def _check_page(image: Image.Image, max_pixels: int, stage: str) -> None:
    samples = len(image.getbands())
    shape = (image.height, image.width) + ((samples,) if samples > 1 else ())
    check_declared_size(shape, 1, max_pixels, whole_file=False, stage=stage)


@contextmanager
def _opened(path: str, max_pixels: int, stage: str) -> Iterator[Image.Image]:
    """The image, opened lazily (header only), with Pillow's bomb limit at `max_pixels`; what goes
    wrong while it is read becomes an InputError."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow warns above its limit and refuses above twice it; _check_page refuses above it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except Image.DecompressionBombError as error:
        raise InputError(TOO_LARGE, f"image is over --max-pixels {max_pixels:,}: {error}", stage) from None
    except PermissionError as error:
        raise InputError(UNREADABLE, f"file cannot be read: {error.strerror}", stage) from None
    except UnidentifiedImageError as error:
        raise InputError(NOT_IMAGE, f"not a readable image: {error}", stage) from None
    except (OSError, EOFError, SyntaxError, ValueError) as error:
        truncated = isinstance(error, EOFError) or "truncated" in str(error).lower()
        raise InputError(TRUNCATED if truncated else CORRUPT_STREAM, f"image cannot be decoded: {error}",
                         stage) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
