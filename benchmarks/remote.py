"""Ingest from a PACS against ingest from the same files on disk, side by side in one run.

Generates CT series (512x512 by default, uncompressed), starts Orthanc with its DICOMweb plugin on a
loopback port (Debian packages orthanc and orthanc-dicomweb; tests/orthanc.py), uploads them, then
alternates, --repeats times, each into a fresh store:
  disk  - `embedstore ingest FOLDER` (random weights, no patch tokens)
  pacs  - `embedstore ingest dicomweb+http://127.0.0.1:PORT/dicom-web`, the same options
with the same --workers for both (decode processes: on the PACS path each also retrieves its
instances, so they are the retrieval concurrency). Prints slices/s of both (the commands' own
--json figures, counted after the model is loaded), their ratio (median of the rounds), where the
PACS run's time goes by stage, and one JSON line.

Object-storage stores (s3://) are not part of embedstore yet, so this benchmark has no S3 half.

    python benchmarks/remote.py [--series 4] [--slices 64] [--size 512] [--workers 0 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/orthanc.py starts the server


def embedstore_ingest(source: str, store: Path, workers: int, args) -> dict:
    out = store.with_suffix(".json")
    command = [str(Path(sys.executable).parent / "embedstore"), "ingest", source, "--store", str(store),
               "--weights", "random", "--model", args.model, "--image-size", str(args.image_size), "--no-patches",
               "--no-progress", "--workers", str(workers), "--json", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"ingest of {source} failed: {finished.stderr.strip()}")
    summary = json.loads(out.read_text())
    assert summary["n_failed"] == 0 and summary["n_embedded"] == args.series * args.slices, summary
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--slices", type=int, default=64, help="slices per series")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each slice")
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="decode (and retrieval) processes")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from embedstore import samples
    from tests.orthanc import Orthanc, orthanc_missing

    if orthanc_missing():
        raise SystemExit(f"cannot run: {orthanc_missing()}")
    scratch = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    archive = scratch / "archive"
    paths = [path for series in range(args.series)
             for path in samples.write_ct_series(archive / f"s{series}", n_slices=args.slices, size=args.size,
                                                 seed=series)]
    figures: dict = {"benchmark": "remote", "slices": len(paths), "size": args.size, "model": args.model,
                     "image_size": args.image_size}
    with Orthanc(scratch / "orthanc") as pacs:
        pacs.upload(paths)
        for workers in args.workers:
            disk, remote = [], []
            for repeat in range(args.repeats):
                disk.append(embedstore_ingest(str(archive), scratch / f"disk-{workers}-{repeat}", workers, args))
                remote.append(embedstore_ingest(pacs.dicomweb, scratch / f"pacs-{workers}-{repeat}", workers, args))
            disk_rate = statistics.median(s["slices_per_s"] for s in disk)
            pacs_rate = statistics.median(s["slices_per_s"] for s in remote)
            figures[f"workers_{workers}"] = {
                "disk_slices_per_s": round(disk_rate, 1), "pacs_slices_per_s": round(pacs_rate, 1),
                "pacs_vs_disk": round(statistics.median(p["slices_per_s"] / d["slices_per_s"]
                                                        for p, d in zip(remote, disk)), 3),
                "pacs_stage_seconds": remote[-1].get("stage_seconds"), "disk_stage_seconds": disk[-1].get("stage_seconds")}
    print(f"{len(paths)} CT slices of {args.size}x{args.size} in {args.series} series, {args.model} random weights at "
          f"{args.image_size} px, Orthanc on loopback; medians of {args.repeats} rounds")
    print(f"{'workers':>8} {'disk slices/s':>14} {'PACS slices/s':>14} {'PACS / disk':>12}")
    for workers in args.workers:
        row = figures[f"workers_{workers}"]
        print(f"{workers:>8} {row['disk_slices_per_s']:>14,.1f} {row['pacs_slices_per_s']:>14,.1f} "
              f"{row['pacs_vs_disk']:>12.2f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
