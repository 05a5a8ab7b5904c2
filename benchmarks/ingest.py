"""Ingest throughput against the physical limit on this machine: a bare timm forward loop.

Generates N 512×512 PNG phantoms, then measures side by side, in one process:
  bare   - timm forward over the same images already decoded and preprocessed in memory
  ingest - `embedstore ingest` (library call, default options: decode workers, patches kept)
and prints both rates, their ratio, and one JSON line. The model is loaded once and shared, so
the comparison is of the pipelines, not of start-up.

    python benchmarks/ingest.py [--n 512] [--model dinov2_vits14] [--image-size 224] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from embedstore import samples
from embedstore.ingest.run import IngestOptions, default_workers, ingest
from embedstore.models import load_model
from embedstore.preprocess import IntensityConfig, imagenet_normalize
from embedstore.sources import ReadTask, decode_task
from embedstore.sources.raster import raster_item


def write_pngs(directory: Path, n: int, size: int = 512) -> list[Path]:
    return [samples.write_png(directory / f"img{i:05d}.png", samples.phantom(size, i)) for i in range(n)]


def bare_forward_rate(model, images: torch.Tensor, batch_size: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        paths = write_pngs(scratch / "archive", args.n)
        loaded = load_model(args.model, "random", args.image_size)
        config = IntensityConfig()
        decoded = np.concatenate([
            decode_task(ReadTask("raster", str(p), [raster_item(str(p))]), config, args.image_size).pixels
            for p in paths
        ])
        images = imagenet_normalize(torch.from_numpy(decoded)).contiguous()
        bare_forward_rate(loaded.model, images[: args.batch_size], args.batch_size)  # warm-up

        bare, pipeline = [], []
        for repeat in range(args.repeats):
            bare.append(bare_forward_rate(loaded.model, images, args.batch_size))
            options = IngestOptions(model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                                    show_progress=False)
            summary = ingest([scratch / "archive"], scratch / f"store{repeat}", options, loaded=loaded)
            assert summary.n_embedded == args.n, summary
            pipeline.append(summary.slices_per_s)

    bare_rate, ingest_rate = statistics.median(bare), statistics.median(pipeline)
    ratio = ingest_rate / bare_rate
    print(f"{args.n} PNGs 512x512 -> {args.model} at {args.image_size}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, decode workers {default_workers()}")
    print(f"{'bare timm forward (pre-decoded)':34s} {bare_rate:8.1f} slices/s   runs {[round(r, 1) for r in bare]}")
    print(f"{'embedstore ingest (end to end)':34s} {ingest_rate:8.1f} slices/s   runs {[round(r, 1) for r in pipeline]}")
    print(f"{'ratio ingest / bare':34s} {ratio:8.3f}   (target >= 0.85)")
    print(f"last run stage seconds: {summary.stage_seconds}")
    print(json.dumps({"benchmark": "ingest", "n": args.n, "model": args.model, "image_size": args.image_size,
                      "bare_slices_per_s": round(bare_rate, 2), "ingest_slices_per_s": round(ingest_rate, 2),
                      "ratio": round(ratio, 4)}))


if __name__ == "__main__":
    main()
