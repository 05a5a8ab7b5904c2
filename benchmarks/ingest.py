"""Ingest throughput against the physical limit on this machine: a bare timm forward loop.

Generates N 512×512 PNG phantoms, then measures, alternating in one run:
  bare   - a timm forward loop over the same images already decoded and preprocessed in memory
  ingest - the `embedstore ingest` command on the PNG folder (random weights, default options:
           patches kept, decode workers as the command picks them), its slices/s from --json
and prints both rates, their ratio, and one JSON line. The command's slices/s is counted from the
start of the run, after the model is loaded, so the comparison is of the pipelines, not of start-up.

    python benchmarks/ingest.py [--n 512] [--model dinov2_vits14] [--image-size 224] [--repeats 2]
                                [--workers N ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_pngs(directory: Path, n: int, size: int = 512) -> list[Path]:
    from embedstore import samples

    return [samples.write_png(directory / f"img{i:05d}.png", samples.phantom(size, i)) for i in range(n)]


def decoded_images(paths: list[Path], spec):
    """The PNGs decoded and preprocessed as ingest does it for `spec` (its size, resize and statistics)."""
    import numpy as np
    import torch

    from embedstore.preprocess import DecodeSettings, decode_task, normalize
    from embedstore.sources import ReadTask
    from embedstore.sources.raster import raster_item

    settings = DecodeSettings(spec.intensity, spec.image_size, (spec.interpolation,))
    pixels = np.concatenate([
        decode_task(ReadTask("raster", str(p), [raster_item(str(p))]), settings).pixels[spec.interpolation]
        for p in paths
    ])
    return normalize(torch.from_numpy(pixels), spec.mean, spec.std).contiguous()


def bare_forward_rate(model, images, batch_size: int) -> float:
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    return len(images) / (time.perf_counter() - started)


def cli_ingest(archive: Path, store: Path, args, workers: int | None) -> dict:
    summary_path = store.with_suffix(".json")
    command = [str(Path(sys.executable).parent / "embedstore"), "ingest", str(archive), "--store", str(store),
               "--model", args.model, "--weights", "random", "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--no-progress", "--json", str(summary_path)]
    if workers is not None:
        command += ["--workers", str(workers)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(summary_path.read_text())
    assert summary["n_embedded"] == args.n, summary
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating bare / ingest pairs")
    parser.add_argument("--workers", type=int, nargs="*", default=[],
                        help="also measure ingest with these decode worker counts (one run each)")
    args = parser.parse_args()

    import torch

    from embedstore.models import load_model

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        paths = write_pngs(scratch / "archive", args.n)
        loaded = load_model(args.model, "random", args.image_size)
        model = loaded.model
        images = decoded_images(paths, loaded.spec)
        bare_forward_rate(model, images, args.batch_size)  # warm-up pass, discarded

        bare, pipeline, summary = [], [], None
        for repeat in range(args.repeats):
            bare.append(bare_forward_rate(model, images, args.batch_size))
            summary = cli_ingest(scratch / "archive", scratch / f"store{repeat}", args, workers=None)
            pipeline.append(summary["slices_per_s"])
        extra = {w: cli_ingest(scratch / "archive", scratch / f"store-w{w}", args, workers=w) for w in args.workers}

    bare_rate, ingest_rate = statistics.median(bare), statistics.median(pipeline)
    ratio = ingest_rate / bare_rate
    print(f"{args.n} PNGs 512x512 -> {args.model} at {args.image_size}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'bare timm forward (pre-decoded)':40s} {bare_rate:8.1f} slices/s   runs {[round(r, 1) for r in bare]}")
    print(f"{'embedstore ingest, default workers=' + str(summary['workers']):40s} {ingest_rate:8.1f} slices/s"
          f"   runs {[round(r, 1) for r in pipeline]}")
    for workers, other in extra.items():
        print(f"{'embedstore ingest, workers=' + str(workers):40s} {other['slices_per_s']:8.1f} slices/s"
              f"   (ratio {other['slices_per_s'] / bare_rate:.3f})")
    print(f"{'ratio ingest / bare':40s} {ratio:8.3f}   (target >= 0.85)")
    print(f"stage seconds of the last default run: {summary['stage_seconds']}")
    print(json.dumps({"benchmark": "ingest", "n": args.n, "model": args.model, "image_size": args.image_size,
                      "bare_slices_per_s": round(bare_rate, 2), "ingest_slices_per_s": round(ingest_rate, 2),
                      "ratio": round(ratio, 4), "workers": summary["workers"],
                      "extra": {w: round(o["slices_per_s"], 2) for w, o in extra.items()}}))


if __name__ == "__main__":
    main()
