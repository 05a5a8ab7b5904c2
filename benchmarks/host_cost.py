"""What a slice costs a decode worker: decode only (`--preprocess-on device`) against decode + preprocessing
(`--preprocess-on workers`, the only placement before it), per core.

On a GPU the model is fast enough that the host decides ingest speed: every slice is read and
decoded, mapped to [0, 1] (HU window, MR percentiles, VOI window), resized to the model's input
with antialiasing and handed to the embedding process as float32. This measures, per input kind,
the CPU milliseconds a decode worker (`preprocess.decode_task`, one thread) spends on a slice:

  decode       - with DecodeSettings.on_device: the file read and the pixels decoded, kept as stored
                 with the mapping's facts (slope and intercept, VOI windows): all a worker does when
                 the model's device maps and resizes
  decode+prep  - the same plus the modality LUT, the intensity mapping and the resize to 224 px in
                 the worker

and the bytes a slice the worker hands back (its pickled DecodedFile): native stored values, or
224 px float32. From the per-core rates it prints the cores one GPU needs to embed 12,000 slices/s
(a ViT-B/14 at 224 px in bf16 on one H100/H200) either way. Then the embedding process's side of
the hand-over (`handoff_cost`).

Inputs, generated here (the reader is embedstore's; the files are what scanners write):
  CT 512 raw   - 512×512 uint16 CT, Explicit VR Little Endian (benchmarks/decode.py's volume)
  CT 512 J2K   - the same, JPEG 2000 lossless (pylibjpeg-openjpeg)
  CT 512 RLE   - the same, RLE lossless (pylibjpeg-rle)
  MR 256       - a 256×256 multi-frame MR object (per-slice 5th-95th percentile mapping)
  DX 2000×2500 - a 12-bit MONOCHROME1 radiograph with a VOI window

One process, one torch thread (as a decode worker runs), readers alternated over the same files
`--repeats` times; the median pass is reported.

    python benchmarks/host_cost.py [--n 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # embedstore from this checkout
from decode import ct_volume, write_pydicom_compressed, write_uncompressed  # noqa: E402  (this folder)

GPU_SLICES_PER_S = 12_000  # ViT-B/14 at 224 px, bf16, one H100/H200
IMAGE_SIZE = 224
RADIOGRAPH = (2000, 2500)  # rows, columns


def write_inputs(root: Path, n: int) -> dict[str, Path]:
    """A folder of files per input kind; their names are the table's rows."""
    import numpy as np
    from pydicom import uid

    from embedstore import samples

    folders = {}
    volume = ct_volume(n)
    for name, write in (("CT 512 raw", partial(write_uncompressed, uid.ExplicitVRLittleEndian, 16)),
                        ("CT 512 J2K", partial(write_pydicom_compressed, uid.JPEG2000Lossless, "pylibjpeg", 16)),
                        ("CT 512 RLE", partial(write_pydicom_compressed, uid.RLELossless, "pylibjpeg", 16))):
        folder = folders[name] = root / name.replace(" ", "-")
        folder.mkdir()
        for index, pixels in enumerate(volume):
            write(pixels, folder / f"{index:04d}.dcm", root)
    folders["MR 256"] = root / "mr"
    samples.write_multiframe_mr(folders["MR 256"] / "mr.dcm", n_frames=n, size=256)
    folders["DX 2000×2500"] = root / "dx"
    rng = np.random.default_rng(0)
    for index in range(max(2, n // 4)):  # a radiograph is one large slice: fewer of them
        image = np.clip(rng.normal(0.5, 0.15, RADIOGRAPH), 0, 1)
        samples.write_xray(folders["DX 2000×2500"] / f"{index}.dcm", image, monochrome1=True,
                           window=(2048, 3000), seed=index)
    return folders


def read_tasks(folder: Path):
    from embedstore.sources.catalog import build_catalog
    from embedstore.sources.discover import check_sources, discover

    found, failures = discover(check_sources([str(folder)]))
    catalog = build_catalog(found, "axial")
    if failures or catalog.failures or not catalog.tasks:
        raise SystemExit(f"{folder}: generated files do not read: {(failures + catalog.failures)[:1]}")
    return catalog.tasks


def measure(tasks, repeats: int) -> dict:
    """Median CPU ms a slice of decode only and decode + preprocessing, and bytes a slice handed back."""
    from embedstore.intensity import IntensityConfig
    from embedstore.preprocess import DecodeSettings, decode_task

    def decode_all(settings) -> list:
        return [decode_task(task, settings) for task in tasks]

    stages = {"decode": partial(decode_all, DecodeSettings(IntensityConfig(), IMAGE_SIZE, on_device=True)),
              "decode+prep": partial(decode_all, DecodeSettings(IntensityConfig(), IMAGE_SIZE))}
    slices = sum(len(task.items) for task in tasks)
    outputs = {name: run() for name, run in stages.items()}  # warm-up, and what each hands back
    spent: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, run in stages.items():
            started = time.process_time()
            run()
            spent[name].append((time.process_time() - started) * 1e3 / slices)
    handed = {name: sum(len(pickle.dumps(decoded)) for decoded in output) / slices for name, output in outputs.items()}
    return {"slices": slices, **{f"{name}_ms": statistics.median(values) for name, values in spent.items()},
            "bytes_native": handed["decode"], "bytes_today": handed["decode+prep"]}


def decode_as_float32(tasks, settings) -> list:
    """A worker's chunk as before stored values travelled: modality LUT applied, float32, pickled."""
    from embedstore.pipeline.decode import decode_chunk

    results = decode_chunk(tasks, settings)
    for result in results:
        result.native.stored, result.native.rescale = result.native.pixels, None
    return results


def handoff_cost(tasks, repeats: int, copies: int = 8) -> dict:
    """CPU ms a slice the embedding process spends receiving native slices from two decode worker
    processes and gathering them into one batch buffer (as the device batcher does), per hand-over:
    pickled float32 through the pipe (modality LUT applied in the worker: the way before), pickled
    stored values, and shared memory (pipeline/handoff.py). Workers' own decode is not counted."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    from embedstore.intensity import IntensityConfig
    from embedstore.pipeline.decode import chunk_tasks, decode_chunk
    from embedstore.pipeline.handoff import adopt_chunk, handoff_directory, remove_directory
    from embedstore.preprocess import DecodeSettings

    settings = DecodeSettings(IntensityConfig(), IMAGE_SIZE, on_device=True)
    chunks = list(chunk_tasks(list(tasks) * copies))
    slices = sum(len(task.items) for chunk in chunks for task in chunk)
    directory = handoff_directory()
    ways = {"pipe float32": partial(decode_as_float32, settings=settings),
            "pipe stored": partial(decode_chunk, settings=settings),
            "shared memory": partial(decode_chunk, settings=settings, handoff=directory)}
    spent: dict[str, list[float]] = {way: [] for way in ways}
    try:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in range(repeats + 1):  # the first pass starts the workers
                for way, run in ways.items():
                    started = time.process_time()
                    for future in [pool.submit(run, chunk) for chunk in chunks]:
                        results = future.result()
                        adopt_chunk(results)
                        np.concatenate([result.native.stored for result in results])  # every value read once
                    spent[way].append((time.process_time() - started) * 1e3 / slices)
    finally:
        remove_directory(directory)
    return {"slices": slices, **{f"{way}_ms": statistics.median(values[1:]) for way, values in spent.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="slices per kind (radiographs: a quarter)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as a decode worker
    rows = {}
    with tempfile.TemporaryDirectory(prefix="host-cost-") as scratch:
        for kind, folder in write_inputs(Path(scratch), args.n).items():
            rows[kind] = measure(read_tasks(folder), args.repeats)
            if kind == "CT 512 raw":
                handoff = handoff_cost(read_tasks(folder), args.repeats)
    print(f"host CPU a slice, one core, resize to {IMAGE_SIZE} px; cores for one GPU at {GPU_SLICES_PER_S:,} slices/s")
    print(f"{'input':<14}{'decode ms':>10}{'+prep ms':>10}{'ratio':>7}{'slices/s':>10}{'today':>8}"
          f"{'cores':>7}{'today':>7}{'KB native':>10}{'KB today':>9}")
    for kind, row in rows.items():
        decode, today = row["decode_ms"], row["decode+prep_ms"]
        row.update(ratio=decode / today, slices_per_s_core=1e3 / decode, slices_per_s_core_today=1e3 / today,
                   cores_per_gpu=GPU_SLICES_PER_S * decode / 1e3, cores_per_gpu_today=GPU_SLICES_PER_S * today / 1e3)
        print(f"{kind:<14}{decode:>10.2f}{today:>10.2f}{row['ratio']:>7.2f}{row['slices_per_s_core']:>10.0f}"
              f"{row['slices_per_s_core_today']:>8.0f}{row['cores_per_gpu']:>7.0f}{row['cores_per_gpu_today']:>7.0f}"
              f"{row['bytes_native'] / 1024:>10.0f}{row['bytes_today'] / 1024:>9.0f}")
    print(f"\nthe embedding process's CPU a 512×512 CT slice, receiving it from 2 decode workers and gathering "
          f"it into a batch ({handoff['slices']} slices):")
    for way in ("pipe float32", "pipe stored", "shared memory"):
        print(f"  {way:<14}{handoff[way + '_ms']:>7.3f} ms  ({1e3 / handoff[way + '_ms']:,.0f} slices/s)")
    print(json.dumps({"benchmark": "host_cost", "image_size": IMAGE_SIZE, "gpu_slices_per_s": GPU_SLICES_PER_S,
                      "inputs": {kind: {key: round(value, 3) for key, value in row.items()}
                                 for kind, row in rows.items()},
                      "handoff_ms": {key: round(value, 4) for key, value in handoff.items()}}))


if __name__ == "__main__":
    main()
