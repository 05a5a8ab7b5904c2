"""Ingest throughput against the physical limit on this machine: a bare timm forward loop.

Generates N 512×512 PNG phantoms, then measures, alternating in one run:
  bare   - a timm forward loop over the same images already decoded and preprocessed in memory
  ingest - the `embedstore ingest` command on the PNG folder (random weights, default options:
           CLS of the last 4 blocks and the last block's patch tokens kept, decode workers as the
           command picks them), its slices/s from --json
for one model, and for two models in one ingest (each slice decoded once) against the two bare
forwards run back to back. Prints the rates, their ratios, and one JSON line. The command's
slices/s is counted from the start of the run, after the models are loaded, so the comparison is
of the pipelines, not of start-up.

    python benchmarks/ingest.py [--n 512] [--model dinov2_vits14] [--second-model dinov2_vitb14]
                                [--image-size 224] [--repeats 2] [--workers N ...]
                                [--preprocess-on workers device]
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

    from embedstore.models.embedder import normalize
    from embedstore.preprocess import DecodeSettings, decode_task
    from embedstore.sources.raster import raster_item
    from embedstore.sources.records import ReadTask

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


def cli_ingest(archive: Path, store: Path, args, workers: int | None, models: list[str],
               preprocess_on: str | None = None) -> dict:
    summary_path = store.with_suffix(".json")
    command = [str(Path(sys.executable).parent / "embedstore"), "ingest", str(archive), "--store", str(store),
               *(part for model in models for part in ("--model", model)), "--weights", "random",
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--no-progress",
               "--json", str(summary_path)]
    if workers is not None:
        command += ["--workers", str(workers)]
    if preprocess_on is not None:
        command += ["--preprocess-on", preprocess_on]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(summary_path.read_text())
    assert summary["n_embedded"] == args.n, summary
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--second-model", default="dinov2_vitb14", help="the other model of the two-model ingest; "
                        "'none' skips that case")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating bare / ingest pairs")
    parser.add_argument("--workers", type=int, nargs="*", default=[],
                        help="also measure ingest with these decode worker counts (one run each)")
    parser.add_argument("--preprocess-on", nargs="*", default=[], choices=["workers", "device"],
                        help="also measure ingest with the intensity mapping and resize placed here, one run each "
                        "after each default run (the default on a CPU: workers)")
    args = parser.parse_args()

    import torch

    from embedstore.models.build import load_model

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        paths = write_pngs(scratch / "archive", args.n)
        names = [args.model] + ([] if args.second_model == "none" else [args.second_model])
        loaded = [load_model(name, "random", args.image_size) for name in names]
        images = [decoded_images(paths, one.spec) for one in loaded]
        for one, batch in zip(loaded, images):
            bare_forward_rate(one.model, batch, args.batch_size)  # warm-up pass, discarded

        rates = {"bare": [], "ingest": [], "bare_two": [], "ingest_two": [],
                 **{f"ingest_{place}": [] for place in args.preprocess_on}}
        summary = None
        for repeat in range(args.repeats):
            bare_one = bare_forward_rate(loaded[0].model, images[0], args.batch_size)
            rates["bare"].append(bare_one)
            summary = cli_ingest(scratch / "archive", scratch / f"store{repeat}", args, None, names[:1])
            rates["ingest"].append(summary["slices_per_s"])
            for place in args.preprocess_on:
                placed = cli_ingest(scratch / "archive", scratch / f"store-{place}{repeat}", args, None, names[:1],
                                    place)
                rates[f"ingest_{place}"].append(placed["slices_per_s"])
            if len(names) == 2:
                bare_two = bare_forward_rate(loaded[1].model, images[1], args.batch_size)
                rates["bare_two"].append(1.0 / (1.0 / bare_one + 1.0 / bare_two))  # the two back to back
                two = cli_ingest(scratch / "archive", scratch / f"store-two{repeat}", args, None, names)
                rates["ingest_two"].append(two["slices_per_s"])
        extra = {w: cli_ingest(scratch / "archive", scratch / f"store-w{w}", args, w, names[:1]) for w in args.workers}

    median = {name: statistics.median(values) if values else None for name, values in rates.items()}
    ratio = median["ingest"] / median["bare"]
    print(f"{args.n} PNGs 512x512 -> {' + '.join(names)} at {args.image_size}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'bare timm forward (pre-decoded)':44s} {median['bare']:8.1f} slices/s   runs {[round(r, 1) for r in rates['bare']]}")
    print(f"{'embedstore ingest, default workers=' + str(summary['workers']):44s} {median['ingest']:8.1f} slices/s"
          f"   runs {[round(r, 1) for r in rates['ingest']]}")
    for workers, other in extra.items():
        print(f"{'embedstore ingest, workers=' + str(workers):44s} {other['slices_per_s']:8.1f} slices/s"
              f"   (ratio {other['slices_per_s'] / median['bare']:.3f})")
    for place in args.preprocess_on:
        placed = median[f"ingest_{place}"]
        print(f"{'embedstore ingest, --preprocess-on ' + place:44s} {placed:8.1f} slices/s"
              f"   runs {[round(r, 1) for r in rates[f'ingest_{place}']]} (ratio {placed / median['bare']:.3f})")
    print(f"{'ratio ingest / bare':44s} {ratio:8.3f}   (target >= 0.9)")
    ratio_two = None
    if median["ingest_two"]:
        ratio_two = median["ingest_two"] / median["bare_two"]
        print(f"{'two bare forwards back to back':44s} {median['bare_two']:8.1f} slices/s")
        print(f"{'embedstore ingest of both models at once':44s} {median['ingest_two']:8.1f} slices/s"
              f"   runs {[round(r, 1) for r in rates['ingest_two']]}")
        print(f"{'ratio two-model ingest / two bare forwards':44s} {ratio_two:8.3f}   (target >= 0.85)")
    print(f"stage seconds of the last one-model run: {summary['stage_seconds']}")
    print(json.dumps({"benchmark": "ingest", "n": args.n, "models": names, "image_size": args.image_size,
                      "bare_slices_per_s": round(median["bare"], 2), "ingest_slices_per_s": round(median["ingest"], 2),
                      "ratio": round(ratio, 4), "two_model_ratio": ratio_two and round(ratio_two, 4),
                      "workers": summary["workers"],
                      "extra": {w: round(o["slices_per_s"], 2) for w, o in extra.items()},
                      "preprocess_on": {place: round(median[f"ingest_{place}"], 2) for place in args.preprocess_on}}))


if __name__ == "__main__":
    main()
