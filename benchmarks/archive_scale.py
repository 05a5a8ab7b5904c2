"""Archive scale: catalog speed against a bare pydicom loop, ingest memory and start-up at N files,
reruns with nothing new, and three writers sharing one archive.

Generates an archive of N small CT files (32x32 uint16, explicit VR little endian, a realistic header:
patient, study, series and SOP UIDs, body part, study dates over five years, series description,
instance number, position along z, orientation, spacing, rescale and window), laid out as
`study_XXXX/series_YYYY/IM_ZZZZ.dcm`, 100 slices a series and 5 series a study. One file is built with
pydicom; every other file is its bytes with the changing values patched in (each has a fixed length), by
a pool of one process per core. Then, side by side in one run:
  catalog - every file read once (the page cache warmed, so that no run pays for the disk), then
            a bare `pydicom.dcmread(path, stop_before_pixels=True)` loop in this process (over every
            file, or --bare-files of them evenly spaced), then `embedstore catalog --header-workers 0`
            (one core) on a fresh store, then the bare loop again, then `embedstore catalog` with one
            header worker per core on another fresh store; --repeats rounds, medians; the catalog's
            rate is files read / its header-reading seconds (read_seconds of its --json summary)
  ingest  - `embedstore ingest` (random ViT-S/14 weights at 56 px, no patch tokens) of the N files into
            a fresh store: its largest process's peak RSS, seconds to the first committed row, wall
            seconds and slices/s
  compare - the same ingest of the first --compare-files files (whole studies) into its own store: the
            peak RSS ratio of N to that
  rerun   - the same ingest again on the N-file store, with nothing new: its wall seconds, and the
            files its catalog read again (none)
  shared  - a separate archive of --shared-files slices; three ingests started at once on one fresh
            store: the slices they embedded together, and the rows and distinct keys stored
Peak RSS comes from wait4 on the one child, so it is the largest single process of that ingest (its
workers included), never the largest of earlier children. Every ingest must embed all its slices and
fail none. `--skip` leaves parts out (`ingest` takes `compare` and `rerun` with it). Prints a table with
each acceptance threshold, and one JSON line.

    python benchmarks/archive_scale.py [--files 100000] [--shared-files 12000] [--compare-files N]
                                       [--archive DIR] [--bare-files 20000] [--repeats 1]
                                       [--model dinov2_vits14] [--skip PART ...] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

SIZE = 32
SLICES_PER_SERIES = 100
SERIES_PER_STUDY = 5
FILES_PER_STUDY = SLICES_PER_SERIES * SERIES_PER_STUDY
SPACING_MM = 2.5
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root
BODY_PARTS = ("CHEST", "ABDOMEN", "HEAD", "PELVIS", "NECK")
DESCRIPTIONS = ("AXIAL 2.5 SOFT TISSUE", "AXIAL 2.5 LUNG", "AXIAL 2.5 BONE", "ARTERIAL PHASE",
                "PORTAL VENOUS PHASE")
MODEL_ARGS = ["--weights", "random", "--no-patches", "--no-progress"]


def model_args(args) -> list[str]:
    return ["--model", args.model, "--image-size", str(args.image_size)]
PARTS = ("catalog", "ingest", "compare", "rerun", "shared")
# Values patched into the template, by keyword (PixelData too): pydicom writes them, we find where.
PATCHED = ("MediaStorageSOPInstanceUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
           "FrameOfReferenceUID", "PatientID", "StudyDate", "SeriesDate", "BodyPartExamined",
           "SeriesDescription", "SeriesNumber", "InstanceNumber", "ImagePositionPatient", "SliceLocation",
           "PixelData")


# --- the archive ----------------------------------------------------------------------------------

def file_path(root: Path, index: int) -> Path:
    study, series = index // FILES_PER_STUDY, index // SLICES_PER_SERIES % SERIES_PER_STUDY
    return root / f"study_{study:04d}" / f"series_{series:04d}" / f"IM_{index % SLICES_PER_SERIES:04d}.dcm"


def series_values(archive_id: int, study: int, series: int) -> dict[str, str]:
    """The header values one series shares, each as long in every file (the template's slots): every
    UID component starts with 1 (no leading zero) and is zero-padded, words are padded with spaces.
    `archive_id` (one digit) keeps two archives' UIDs apart."""
    study_uid = f"{UID_ROOT}{archive_id}.1{study:06d}"
    date = f"{2019 + study % 5}{1 + study % 12:02d}{1 + study % 28:02d}"
    return {"StudyInstanceUID": study_uid, "SeriesInstanceUID": f"{study_uid}.1{series:02d}",
            "FrameOfReferenceUID": f"{study_uid}.2", "PatientID": f"PAT{study // 2:06d}",
            "StudyDate": date, "SeriesDate": date,
            "BodyPartExamined": BODY_PARTS[study % len(BODY_PARTS)].ljust(max(map(len, BODY_PARTS))),
            "SeriesDescription": DESCRIPTIONS[series % len(DESCRIPTIONS)].ljust(max(map(len, DESCRIPTIONS))),
            "SeriesNumber": str(series + 1)}


def slice_values(series: dict[str, str], slice_: int) -> dict[str, str]:
    z = -500.0 + SPACING_MM * slice_  # -500.00 to -252.50: as wide in every file
    sop_uid = f"{series['SeriesInstanceUID']}.1{slice_:04d}"
    return {**series, "MediaStorageSOPInstanceUID": sop_uid, "SOPInstanceUID": sop_uid,
            "InstanceNumber": str(slice_ + 1), "ImagePositionPatient": f"-11.2\\-11.2\\{z:.2f}",
            "SliceLocation": f"{z:.2f}"}


def slice_pixels(seed: int = 0) -> list[bytes]:
    """Stored values (HU + 1024) of one phantom volume, one slice per slice index."""
    import numpy as np

    from embedstore import samples

    hu = samples.ct_series_hu(SLICES_PER_SERIES, SIZE, seed)
    return [np.clip(np.rint(one) + 1024, 0, 4095).astype(np.uint16).tobytes() for one in hu]


def template_dataset(values: dict[str, str], pixels: bytes):
    from embedstore import samples

    ds = samples.scanner_ct_header(SIZE)
    ds.SeriesTime, ds.StudyDescription = "101700", "CT GENERATED"
    ds.PatientName, ds.PatientSex = "Anonymous^Patient", "O"
    ds.KVP, ds.SliceThickness = "120", SPACING_MM
    ds.StudyID = "1"
    ds.PixelSpacing = [0.7, 0.7]
    for keyword, value in values.items():
        setattr(ds.file_meta if keyword.startswith("MediaStorage") else ds, keyword, value)
    ds.PixelData = pixels
    return ds


def template_slots(encoded: bytes) -> list[tuple[int, int, str]]:
    """(value offset, value length, keyword) of each patched element in `encoded`, in file order,
    found by its explicit-VR header (tag, VR, length), which occurs once in the template."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    slots = []
    for keyword in PATCHED:
        tag, vr = tag_for_keyword(keyword), dictionary_VR(keyword).split(" or ")[-1]
        prefix = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode())
        at = encoded.find(prefix)
        assert at > 0 and encoded.find(prefix, at + 1) < 0, keyword
        if keyword == "PixelData":  # OW: 2 reserved bytes, then a 4-byte length
            slots.append((at + 12, struct.unpack_from("<I", encoded, at + 8)[0], keyword))
        else:
            slots.append((at + 8, struct.unpack_from("<H", encoded, at + 6)[0], keyword))
    return sorted(slots)


def build_template(pixels: bytes) -> tuple[list[bytes], list[tuple[int, str, bytes]]]:
    """The template cut around its patched values: (constant chunks, (length, keyword, pad byte) of
    each slot between them)."""
    from io import BytesIO

    buffer = BytesIO()
    widest = slice_values(series_values(1, 0, 0), SLICES_PER_SERIES - 1)  # InstanceNumber 100
    template_dataset(widest, pixels).save_as(buffer, enforce_file_format=True)
    encoded = buffer.getvalue()
    chunks, slots, start = [], [], 0
    for offset, length, keyword in template_slots(encoded):
        chunks.append(encoded[start:offset])
        slots.append((length, keyword, b"\0" if keyword.endswith("UID") else b" "))
        start = offset + length
    chunks.append(encoded[start:])
    return chunks, slots


def encode_file(chunks: list[bytes], slots: list, values: dict[str, str], pixels: bytes) -> bytes:
    parts = [chunks[0]]
    for (length, keyword, pad), chunk in zip(slots, chunks[1:]):
        value = pixels if keyword == "PixelData" else values[keyword].encode().ljust(length, pad)
        assert len(value) == length, (keyword, value)  # never longer than the template's
        parts += (value, chunk)
    return b"".join(parts)


_TEMPLATE = None  # (chunks, slots, pixels) in each generating process


def load_template() -> None:
    global _TEMPLATE
    pixels = slice_pixels()
    _TEMPLATE = (*build_template(pixels[0]), pixels)


def write_study(task: tuple[str, int, int, int]) -> int:
    """Write the first `n_files` files of one study; returns how many."""
    root, archive_id, study, n_files = task
    chunks, slots, pixels = _TEMPLATE
    for offset in range(0, n_files, SLICES_PER_SERIES):
        first = study * FILES_PER_STUDY + offset
        file_path(Path(root), first).parent.mkdir(parents=True, exist_ok=True)
        shared = series_values(archive_id, study, offset // SLICES_PER_SERIES)
        for slice_ in range(min(SLICES_PER_SERIES, n_files - offset)):
            file_path(Path(root), first + slice_).write_bytes(
                encode_file(chunks, slots, slice_values(shared, slice_), pixels[slice_]))
    return n_files


def count_files(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def generate(root: Path, n_files: int, archive_id: int) -> float | None:
    """Write the archive unless `root` already holds its N files; returns the seconds taken (None if reused)."""
    found = count_files(root) if root.exists() else 0
    if found == n_files:
        return None
    if found > n_files:
        sys.exit(f"{root} holds {found:,} files, more than --files {n_files:,}")
    started = time.perf_counter()
    tasks = [(str(root), archive_id, study, min(FILES_PER_STUDY, n_files - study * FILES_PER_STUDY))
             for study in range(-(-n_files // FILES_PER_STUDY))]
    with Pool(len(os.sched_getaffinity(0)), initializer=load_template) as pool:
        written = sum(pool.imap_unordered(write_study, tasks))
    assert written == n_files
    return time.perf_counter() - started


def check_archive(root: Path, n_files: int) -> None:
    """A few files, from first to last, parse with pydicom, decode, and have distinct SOP UIDs and positions."""
    import pydicom

    picks = sorted({index for index in (0, 1, SLICES_PER_SERIES, n_files // 2, n_files - 1) if index < n_files})
    datasets = [pydicom.dcmread(file_path(root, index)) for index in picks]
    assert all(ds.pixel_array.shape == (SIZE, SIZE) and ds.Modality == "CT" for ds in datasets)
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(picks)
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in datasets)
    positions = {(ds.SeriesInstanceUID, float(ds.ImagePositionPatient[2])) for ds in datasets}
    assert len(positions) == len(picks), positions


# --- measurements ---------------------------------------------------------------------------------

def bare_rate(paths: list[Path]) -> float:
    """Files/s of a bare header-reading loop in this process."""
    import pydicom

    started = time.perf_counter()
    for path in paths:
        pydicom.dcmread(path, stop_before_pixels=True)
    return len(paths) / (time.perf_counter() - started)


def read_folder(folder: Path) -> int:
    """Read every file under `folder` once (into the page cache); the bytes read."""
    return sum(len(path.read_bytes()) for path in folder.rglob("*") if path.is_file())


def warm_page_cache(archive: Path, cores: int) -> None:
    """Every file of the archive read once, so that the catalogs measured one after the other all read
    from memory: otherwise the first one pays for the disk and the ratio measures the cache."""
    with Pool(cores) as pool:
        pool.map(read_folder, sorted(archive.iterdir()))


def run_measured(command: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB of the command's largest process, its children included): wait4
    gives this one child's usage, where RUSAGE_CHILDREN would keep the largest of every child so far."""
    started = time.perf_counter()
    with log.open("w") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode:
        sys.exit(f"{' '.join(command)} exited {child.returncode}:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def embedstore(*args) -> list[str]:
    return [str(Path(sys.executable).parent / "embedstore"), *map(str, args)]


def catalog(archive: Path, store: Path, header_workers: int) -> dict:
    """The catalog's summary, with the command's wall seconds and files read per header-reading second."""
    out = store.with_suffix(".json")
    command = embedstore("catalog", archive, "--store", store, "--header-workers", header_workers,
                         "--no-progress", "--json", out)
    wall, _ = run_measured(command, store.with_suffix(".log"))
    summary = json.loads(out.read_text())
    assert summary["files_failed"] == 0, f"the catalog failed files: see the files table of {store}"
    return {**summary, "wall_seconds": wall, "rate": summary["files_read"] / summary["read_seconds"]}


def ingest(sources: list[Path], store: Path, model: list[str], name: str, expected: int) -> dict:
    """The ingest's summary, with the command's wall seconds and peak RSS; it must embed `expected`
    slices and fail none, or its figures would describe another job."""
    out = store.parent / f"{name}.json"
    wall, rss = run_measured(embedstore("ingest", *sources, "--store", store, *model, *MODEL_ARGS,
                                        "--json", out), store.parent / f"{name}.log")
    summary = json.loads(out.read_text())
    assert summary["n_embedded"] == expected and summary["n_failed"] == 0, \
        f"{name}: {summary['n_embedded']:,} slices embedded of {expected:,}, failed {summary['failures_by_reason']}"
    return {**summary, "wall_seconds_measured": wall, "peak_rss_mib": rss}


def concurrent_ingests(archive: Path, store: Path, model: list[str], n: int) -> list[dict]:
    """Summaries of n ingests of one archive into one store, started at once."""
    outs = [store.parent / f"shared-{i}.json" for i in range(n)]
    logs = [(store.parent / f"shared-{i}.log").open("w") for i in range(n)]
    children = [subprocess.Popen(embedstore("ingest", archive, "--store", store, *model, *MODEL_ARGS,
                                            "--json", out), stdout=subprocess.DEVNULL, stderr=log)
                for out, log in zip(outs, logs)]
    for child, log in zip(children, logs):
        if child.wait():
            sys.exit(f"a concurrent ingest exited {child.returncode}:\n{Path(log.name).read_text()[-3000:]}")
        log.close()
    summaries = [json.loads(out.read_text()) for out in outs]
    assert not any(summary["n_failed"] for summary in summaries), [s["failures_by_reason"] for s in summaries]
    return summaries


def stored_counts(store: Path, table: str) -> tuple[int, int]:
    """(rows, distinct keys) of one table of the store, as `embedstore sql` counts them."""
    query = f'SELECT count(*) AS rows, count(DISTINCT key) AS keys FROM "{table}"'
    answer = subprocess.run(embedstore("sql", store, query, "--json", "-"), check=True, capture_output=True, text=True)
    (counts,) = json.loads(answer.stdout)
    return counts["rows"], counts["keys"]


# --- the parts ------------------------------------------------------------------------------------

def measure_catalog(archive: Path, scratch: Path, args, cores: int) -> dict:
    """Bare loop, one-core catalog, bare loop, all-cores catalog, --repeats times, each catalog on a
    fresh store; medians of each, so that a busy machine slows both sides alike."""
    step = max(1, args.files // args.bare_files)
    paths = [file_path(archive, index) for index in range(0, args.files, step)][:args.bare_files]
    warm_page_cache(archive, cores)
    bare_rate(paths[:200])  # warm the imports
    bare, one, every = [], [], []
    for repeat in range(args.repeats):
        bare.append(bare_rate(paths))
        one.append(catalog(archive, scratch / f"catalog-one-{repeat}", 0))
        bare.append(bare_rate(paths))
        every.append(catalog(archive, scratch / f"catalog-all-{repeat}", cores))
    assert all(run["files_read"] == args.files for run in one + every), (one, every)

    def median(runs: list[dict], field: str) -> float:
        return statistics.median(run[field] for run in runs)

    return {"bare_files": len(paths), "bare_files_per_s": statistics.median(bare),
            "bare_runs": [round(rate, 1) for rate in bare],
            "catalog_one_core_files_per_s": median(one, "rate"),
            "catalog_one_core_wall_seconds": median(one, "wall_seconds"),
            "catalog_one_core_read_seconds": median(one, "read_seconds"),
            "catalog_vs_bare": median(one, "rate") / statistics.median(bare),
            "catalog_all_cores_files_per_s": median(every, "rate"),
            "catalog_all_cores_wall_seconds": median(every, "wall_seconds"),
            "catalog_all_cores_read_seconds": median(every, "read_seconds"),
            "header_workers_all": every[0]["header_workers"],
            "all_cores_vs_one_core": median(every, "rate") / median(one, "rate")}


def measure_ingest(archive: Path, scratch: Path, args, parts: set[str]) -> dict:
    store = scratch / "ingest" / "store"
    store.parent.mkdir()
    first = ingest([archive], store, model_args(args), "ingest", args.files)
    figures = {"ingest_peak_rss_mib": first["peak_rss_mib"], "first_row_seconds": first.get("first_row_seconds"),
               "ingest_wall_seconds": first["wall_seconds_measured"], "ingest_slices_per_s": first["slices_per_s"],
               "ingest_embedded": first["n_embedded"]}
    if "compare" in parts:
        studies = max(1, args.compare_files // FILES_PER_STUDY)
        sources = [file_path(archive, study * FILES_PER_STUDY).parent.parent for study in range(studies)]
        small = ingest(sources, scratch / "ingest" / "compare-store", model_args(args), "compare",
                       min(args.files, studies * FILES_PER_STUDY))
        figures |= {"compare_files": small["n_found"], "compare_peak_rss_mib": small["peak_rss_mib"],
                    "compare_first_row_seconds": small.get("first_row_seconds"),
                    "compare_wall_seconds": small["wall_seconds_measured"],
                    "peak_rss_ratio": first["peak_rss_mib"] / small["peak_rss_mib"]}
    if "rerun" in parts:
        again = ingest([archive], store, model_args(args), "rerun", 0)
        rerun_catalog = again.get("catalog", {})
        figures |= {"rerun_seconds": again["wall_seconds_measured"],
                    "rerun_files_read": rerun_catalog.get("files_read"), "rerun_catalog": rerun_catalog}
    return figures


def measure_shared(scratch: Path, args) -> dict:
    archive = scratch / "shared-archive"
    generate(archive, args.shared_files, archive_id=2)
    store = scratch / "shared" / "store"
    store.parent.mkdir()
    summaries = concurrent_ingests(archive, store, model_args(args), 3)
    model_id = summaries[0]["model_ids"][0]
    embedded = sum(summary["embedded_by_model"][model_id] for summary in summaries)
    rows, keys = stored_counts(store, "items")
    vector_rows, vector_keys = stored_counts(store, f"slices-{model_id}")
    return {"shared_files": args.shared_files, "shared_embedded_sum": embedded,
            "shared_embedded_ratio": embedded / args.shared_files,
            "shared_embedded_each": [summary["embedded_by_model"][model_id] for summary in summaries],
            "shared_rows": rows, "shared_distinct_keys": keys,
            "shared_vector_rows": vector_rows, "shared_vector_distinct_keys": vector_keys}


# --- the report -----------------------------------------------------------------------------------

def acceptance(figures: dict, n_shared: int) -> dict[str, tuple[str, bool]]:
    """(threshold, passed) of each acceptance figure measured."""
    rules = {
        "catalog_vs_bare": (">= 0.8", lambda v: v >= 0.8),
        "all_cores_vs_one_core": (">= 1.6", lambda v: v >= 1.6),
        "peak_rss_ratio": ("<= 1.5", lambda v: v <= 1.5),
        "rerun_seconds": ("<= 60", lambda v: v <= 60),
        "rerun_files_read": ("== 0", lambda v: v == 0),
        "shared_embedded_ratio": ("<= 1.1", lambda v: v <= 1.1),
        **{name: (f"== {n_shared:,}", lambda v: v == n_shared)
           for name in ("shared_rows", "shared_distinct_keys", "shared_vector_rows", "shared_vector_distinct_keys")},
    }
    return {name: (threshold, bool(check(figures[name]))) for name, (threshold, check) in rules.items()
            if name in figures}


UNITS = {"files_per_s": "files/s", "slices_per_s": "slices/s", "seconds": "s", "rss_mib": "MiB"}


def print_table(figures: dict, verdicts: dict) -> None:
    print(f"{'figure':<36}{'value':>14}  {'unit':<9}{'acceptance':>12}  pass")
    for name, value in figures.items():
        if isinstance(value, (dict, list)):
            continue
        unit = next((unit for suffix, unit in UNITS.items() if name.endswith(suffix)), "")
        shown = f"{value:,}" if isinstance(value, int) else f"{value:,.2f}" if isinstance(value, float) else "-"
        threshold, passed = verdicts.get(name, ("", None))
        print(f"{name:<36}{shown:>14}  {unit:<9}{threshold:>12}  {'' if passed is None else 'yes' if passed else 'NO'}")


def rounded(figures: dict) -> dict:
    return {name: round(value, 3) if isinstance(value, float) else value for name, value in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000, help="files in the archive (1,000,000 is the headline)")
    parser.add_argument("--shared-files", type=int, default=12_000, help="slices of the three writers' archive")
    parser.add_argument("--compare-files", type=int, default=None,
                        help="files of the smaller ingest, in whole studies of 500 (default 100,000 above "
                             "100,000 files, else a tenth)")
    parser.add_argument("--archive", type=Path, default=None,
                        help="generate the archive here, or reuse it when it holds --files files")
    parser.add_argument("--bare-files", type=int, default=20_000,
                        help="files of the bare pydicom loop, evenly spaced through the archive")
    parser.add_argument("--repeats", type=int, default=1, help="bare loop / catalog rounds (medians)")
    parser.add_argument("--model", default="dinov2_vits14",
                        help="the model ingests embed with (random weights); test_vit at 64 px makes 10^6 slices "
                        "a CPU matter of the decode alone")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="leave these parts out")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (stores, logs, archive)")
    args = parser.parse_args()
    if args.compare_files is None:
        args.compare_files = 100_000 if args.files > 100_000 else args.files // 10
    parts = set(PARTS) - set(args.skip) - ({"compare", "rerun"} if "ingest" in args.skip else set())
    cores = len(os.sched_getaffinity(0))

    scratch = Path(tempfile.mkdtemp(prefix="archive-scale-"))
    try:
        archive = args.archive or scratch / "archive"
        seconds = generate(archive, args.files, archive_id=1)
        check_archive(archive, args.files)
        figures = {"files": args.files, "cores": cores, "load_1min_before": os.getloadavg()[0]}
        if seconds is not None:
            figures |= {"generate_seconds": seconds, "generate_files_per_s": args.files / seconds}
        if "catalog" in parts:
            figures |= measure_catalog(archive, scratch, args, cores)
        if "ingest" in parts:
            figures |= measure_ingest(archive, scratch, args, parts)
        if "shared" in parts:
            figures |= measure_shared(scratch, args)
        figures["load_1min_after"] = os.getloadavg()[0]  # other work on the machine skews every ratio
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch)

    verdicts = acceptance(figures, args.shared_files)
    print(f"{args.files:,} CT files of {SIZE}x{SIZE} in studies of {SERIES_PER_STUDY} series x {SLICES_PER_SERIES}, "
          f"{cores} cores; ingest: {args.model} random weights at {args.image_size} px, no patch tokens")
    if "catalog" in parts:
        sample = "all" if figures["bare_files"] == args.files else f"{figures['bare_files']:,} evenly spaced of"
        print(f"bare pydicom loop over {sample} {args.files:,} files, runs {figures['bare_runs']} (files/s) "
              f"taking turns with the catalogs; a catalog's rate is files read / its read seconds; "
              f"medians of {args.repeats} round(s)")
    print_table(figures, verdicts)
    print(json.dumps({"benchmark": "archive_scale", **rounded(figures),
                      "acceptance": {name: passed for name, (_, passed) in verdicts.items()}}))


if __name__ == "__main__":
    main()
