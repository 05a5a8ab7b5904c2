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

Then the store half: search latency on a store in S3-compatible object storage against a local store
of the same --store-rows synthetic rows (benchmarks/synthetic.py: ViT-B width, 768), side by side in one
process: moto's S3 server on a loopback port (tests/s3server.py), one opened store per side, the same
--queries slice keys; p50 of exact search (every vector read from the table), then of search through
an IVF index built by `embedstore index` on each, with the seconds the index took to build and the
requests the S3 server served per search (query by key included), from its log.

    python benchmarks/remote.py [--series 4] [--slices 64] [--size 512] [--workers 0 2] [--repeats 2]
                                [--store-rows 100000] [--queries 20] [--skip pacs|store]
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
    parser.add_argument("--store-rows", type=int, default=100_000, help="rows of the S3 and local stores searched")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--skip", choices=["pacs", "store"], action="append", default=[])
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    figures: dict = {"benchmark": "remote"}
    if "pacs" not in args.skip:
        figures["pacs"] = pacs_versus_disk(args, scratch)
    if "store" not in args.skip:
        figures["store"] = search_on_s3_versus_local(args, scratch)
    print(json.dumps(figures))


def pacs_versus_disk(args, scratch: Path) -> dict:
    from embedstore import samples
    from tests.orthanc import Orthanc, orthanc_missing

    if orthanc_missing():
        raise SystemExit(f"cannot run: {orthanc_missing()}")
    archive = scratch / "archive"
    paths = [path for series in range(args.series)
             for path in samples.write_ct_series(archive / f"s{series}", n_slices=args.slices, size=args.size,
                                                 seed=series)]
    figures: dict = {"slices": len(paths), "size": args.size, "model": args.model, "image_size": args.image_size}
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
    return figures


def search_on_s3_versus_local(args, scratch: Path) -> dict:
    import os

    import numpy as np

    from synthetic import write_synthetic_store  # this folder is on the path: the script's own
    from embedstore.search.index import build_index
    from embedstore.search.similar import query_by_key, search
    from embedstore.store import Store
    from tests.s3server import S3Server, s3_server_missing

    if s3_server_missing():
        raise SystemExit(f"cannot run the store half: {s3_server_missing()}")
    keys = [f"synthetic:{i}" for i in np.random.default_rng(1).choice(args.store_rows, args.queries, replace=False)]
    figures: dict = {"rows": args.store_rows, "queries": args.queries}
    with S3Server(scratch / "s3") as server:
        os.environ.update({**server.environment, "EMBEDSTORE_CACHE": str(scratch / "cache"),
                           "EMBEDSTORE_PATIENT_ID_KEY": os.urandom(32).hex()})
        server.make_bucket("bench")
        places = {"local": str(scratch / "store"), "s3": "s3://bench/store"}
        for side, where in places.items():
            started = time.perf_counter()
            model_id = write_synthetic_store(where, args.store_rows, (1.0,))[0][0]
            figures[f"{side}_write_s"] = round(time.perf_counter() - started, 1)

        def p50_ms(store: Store, plan: str) -> float:
            times, requests = [], server.requests()
            for key in keys:
                started = time.perf_counter()
                hits = search(store, query_by_key(store, key, "cls", model_id), k=10, feature="cls")
                times.append((time.perf_counter() - started) * 1000)
                assert len(hits) == 10
            if str(store.path).startswith("s3://"):
                figures[f"s3_{plan}_requests_per_search"] = round((server.requests() - requests) / len(keys))
            return round(statistics.median(times), 1)

        for plan in ("exact", "indexed"):
            for side, where in places.items():
                if plan == "indexed":
                    started = time.perf_counter()
                    build_index(Store.open(where), model_id, "cls")
                    figures[f"{side}_index_build_s"] = round(time.perf_counter() - started, 1)
                figures[f"{side}_{plan}_p50_ms"] = p50_ms(Store.open(where), plan)
            figures[f"s3_vs_local_{plan}"] = round(figures[f"s3_{plan}_p50_ms"] / figures[f"local_{plan}_p50_ms"], 2)
    print(f"search over {args.store_rows:,} rows (768-d), {args.queries} queries, p50 ms: "
          f"exact local {figures['local_exact_p50_ms']} / S3 {figures['s3_exact_p50_ms']} "
          f"({figures['s3_vs_local_exact']}x); indexed local {figures['local_indexed_p50_ms']} / S3 "
          f"{figures['s3_indexed_p50_ms']} ({figures['s3_vs_local_indexed']}x); S3 requests per search: exact "
          f"{figures['s3_exact_requests_per_search']}, indexed {figures['s3_indexed_requests_per_search']}")
    return figures


if __name__ == "__main__":
    main()
