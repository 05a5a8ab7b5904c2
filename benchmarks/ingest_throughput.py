"""Ray's overhead: the same generated slices ingested by the local executor and on Ray, side by side.

Writes N generated 512×512 16-bit CT slices (uncompressed DICOM, one series per 100 slices), then
alternates, `--repeats` times, a fresh-store ingest with each executor (random weights, patches
kept, default options otherwise) and prints the slices/s of each, their ratio (target >= 0.9: Ray's
overhead at most 10%), and one JSON line. Ray's local cluster is started once before the timed runs
and its start-up is reported apart: on a real cluster it is already running.

    python benchmarks/ingest_throughput.py [--n 1000] [--model dinov2_vits14] [--image-size 224] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SLICES_PER_SERIES = 100


def write_archive(root: Path, n: int) -> Path:
    from embedstore import samples

    for series in range(0, n, SLICES_PER_SERIES):
        samples.write_ct_series(root / f"series{series // SLICES_PER_SERIES:03d}", n_slices=min(SLICES_PER_SERIES, n - series),
                                size=512, seed=series, patient_id=f"PAT{series:04d}")
    return root


def timed_ingest(archive: Path, store: Path, args, executor: str) -> dict:
    from embedstore.pipeline.ingest import IngestOptions, ingest

    options = IngestOptions(models=(args.model,), weights="random", image_size=args.image_size, executor=executor,
                            show_progress=False)
    summary = ingest([archive], store, options)
    return {"slices_per_s": summary.slices_per_s, "seconds": summary.seconds, "n_embedded": summary.n_embedded,
            "engine": summary.engine, "stage_seconds": summary.stage_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from embedstore.pipeline.on_ray import start_ray

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        archive = write_archive(scratch / "archive", args.n)
        started = time.perf_counter()
        start_ray(None)
        ray_start_s = time.perf_counter() - started
        runs: dict[str, list[dict]] = {"local": [], "ray": []}
        for repeat in range(args.repeats):  # A/B: drift and noise land on both alike
            for executor in runs:
                run = timed_ingest(archive, scratch / f"store-{executor}-{repeat}", args, executor)
                if run["n_embedded"] != args.n:
                    raise SystemExit(f"{executor} embedded {run['n_embedded']} of {args.n} slices")
                runs[executor].append(run)
                print(f"{executor:5s} run {repeat + 1}: {run['slices_per_s']:7.2f} slices/s "
                      f"({run['seconds']:.1f} s; stages {run['stage_seconds']})")
    local = statistics.median(r["slices_per_s"] for r in runs["local"])
    on_ray = statistics.median(r["slices_per_s"] for r in runs["ray"])
    print(f"\n{args.n} CT slices 512x512 → {args.model} at {args.image_size}px, random weights, patches kept")
    print(f"{'executor':10s} {'slices/s':>9s}")
    print(f"{'local':10s} {local:9.2f}")
    print(f"{'ray':10s} {on_ray:9.2f}")
    print(f"ratio ray/local {on_ray / local:.3f} (target >= 0.9); Ray local cluster start-up {ray_start_s:.1f} s, not counted")
    print(json.dumps({"benchmark": "ingest_throughput", "n": args.n, "model": args.model,
                      "image_size": args.image_size, "local_slices_per_s": round(local, 2),
                      "ray_slices_per_s": round(on_ray, 2), "ratio": round(on_ray / local, 3),
                      "ray_start_s": round(ray_start_s, 1), "runs": runs}))


if __name__ == "__main__":
    main()
