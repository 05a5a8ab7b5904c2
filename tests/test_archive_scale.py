"""Archive scale (issue 24): the catalog is part of the store. Reruns read no header twice, changed,
gone and new files are told apart, a series spread over folders is grouped once, concurrent ingests
share the series through leases, a killed catalog resumes where it stopped, and Ray reads headers
as tasks that commit their own rows."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from embedstore import samples
from embedstore.store import Store
from embedstore.store.leases import LEASES_DIR, Claim, LeaseBook
from embedstore.store.schema import slices_table_name
from tests.support import TEST_IMAGE_SIZE, ingest_options, run_cli_here

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # pixels a side of every generated slice
SUBPROCESS_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------ helpers

def write_series(root: Path, folder: str, n_slices: int, seed: int) -> list[Path]:
    """A CT series of its own (UIDs from seed and patient) under root/folder, anatomical order."""
    return samples.write_ct_series(root / folder, n_slices=n_slices, size=SIZE, seed=seed, patient_id=f"P{seed}")


def ingest_here(sources, store_path: Path, **overrides):
    """An ingest in this process: random-weight DINOv2 at 56 px, no patch tokens, headers read inline."""
    from embedstore.pipeline.ingest import ingest

    return ingest([Path(s) for s in sources], store_path,
                  ingest_options(**{"keep_patches": False, "header_workers": 0, **overrides}))


def catalog_here(sources, store_path: Path, **options):
    from embedstore.catalog.scan import CatalogOptions
    from embedstore.pipeline.catalog_job import catalog_archive

    return catalog_archive([Path(s) for s in sources], store_path, CatalogOptions(**{"header_workers": 0, **options}),
                           show_progress=False)


def embedstore_command(*args) -> list[str]:
    return [sys.executable, "-m", "embedstore.cli.main", *map(str, args)]


def only_model(store: Store) -> str:
    return store.resolve_model_id(None)


def keys_of(store: Store, table: str, where: str | None = None) -> list[str]:
    return store.rows(table, where, ["key"]).column("key").to_pylist()


def file_paths(store: Store) -> list[str]:
    return store.rows("files", columns=["path"]).column("path").to_pylist()


def archive_files(root: Path) -> set[str]:
    return {str(path) for path in root.rglob("*") if path.is_file()}


def assert_one_row_per_file(store_path: Path, root: Path) -> None:
    paths = file_paths(Store.open(store_path))
    duplicated = [path for path, n in Counter(paths).items() if n > 1]
    assert not duplicated, f"{len(duplicated)} paths have several files rows, e.g. {duplicated[:3]}"
    assert set(paths) == archive_files(root)


def assert_one_row_per_slice(store_path: Path, n_slices: int) -> None:
    """items and the model's vector table hold each slice exactly once, with the same keys."""
    store = Store.open(store_path)
    items = keys_of(store, "items")
    vectors = keys_of(store, slices_table_name(only_model(store)))
    assert len(items) == len(set(items)) == n_slices
    assert len(vectors) == len(set(vectors)) == n_slices
    assert set(items) == set(vectors)


def assert_check_is_clean(store_path: Path, monkeypatch, capsys) -> None:
    code, out, err = run_cli_here(["check", str(store_path), "--json"], monkeypatch, capsys)
    report = json.loads(out)
    assert code == 0 and report["clean"], (report["findings"], err)


def file_count(store_path: Path) -> int:
    """Rows in the store's files table now; 0 while the store or the table is still being made."""
    try:
        return Store.open(store_path).count("files")
    except Exception:  # noqa: BLE001 - no manifest yet, no table yet, a version being written
        return 0


def link_archive(root: Path, n_files: int, per_folder: int = 500) -> Path:
    """n_files DICOM files (hard links of a few generated slices: the catalog reads headers only)."""
    templates = samples.write_ct_series(root.parent / "templates", n_slices=4, size=SIZE, seed=90)
    for index in range(n_files):
        folder = root / f"d{index // per_folder:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(templates[index % len(templates)], folder / f"f{index:06d}.dcm")
    return root


def kill_when_partly_catalogued(command: list[str], store_path: Path, total: int, cwd: Path) -> int:
    """Start `command` (a catalog of `total` files into `store_path`), SIGKILL it and every process it
    started once the files table holds some but not all rows; the rows present once all are dead."""
    errors = cwd / "catalog.stderr"
    with open(errors, "w") as stderr:
        process = subprocess.Popen(command, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    try:
        seen = 0
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while seen == 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            seen = file_count(store_path)
        assert process.poll() is None, f"the catalog ended before it could be killed ({seen} of {total} rows): " \
                                       f"{errors.read_text()[-2000:]}"
        assert 0 < seen < total, f"the catalog was to be killed mid-run, it had committed {seen} of {total} rows"
    finally:
        # Ray runs each task in a process group of its own: a task in flight outlives a kill of the
        # catalog's group and commits its rows a moment later, so every descendant is killed by pid.
        started = descendants(process.pid)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the catalog and what it started in its group
        process.wait()
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in started)
    settled, present = -1, file_count(store_path)
    while settled != present:  # nothing it started may still be committing
        time.sleep(1.0)
        settled, present = present, file_count(store_path)
    return present


def descendants(pid: int) -> list[int]:
    """Every live process descended from `pid` (by parent pid, whatever its session or group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@contextmanager
def within(seconds: float):
    """Fail instead of hanging: an ingest waits for the series whose leases it takes for held."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: waiting for a lease that was free?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped): nothing answers to it."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_lease(store_path: Path, part: str, model_ids: list[str], **fields) -> Path:
    """A lease as another writer of these models leaves it: JSON {run_id, host, pid, done, expires}."""
    lease = {"run_id": "another-run", "host": socket.gethostname(), "pid": os.getpid(), "done": False,
             "expires": time.time() + 600.0, **fields}
    path = LeaseBook(Store.open(store_path), "writer", model_ids).path_of(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lease))
    return path


def model_ids_for(**overrides) -> list[str]:
    """The model ids `ingest_here` with these overrides embeds with (leases are per set of models)."""
    from embedstore.pipeline.ingest import check_options, load_models

    options = ingest_options(**{"keep_patches": False, **overrides})
    return [m.model_id for m in load_models(options, check_options(options)[0])]


def finished_ingests(processes: list, outs: list[Path], store_path: Path) -> tuple[str, list[dict]]:
    """The store's model and each ingest's summary, once every one has exited 0."""
    results = [process.communicate(timeout=SUBPROCESS_TIMEOUT_S) for process in processes]
    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]
    return only_model(Store.open(store_path)), [json.loads(out.read_text()) for out in outs]


def series_uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


# ------------------------------------------------------------------------------------ reruns

def test_a_rerun_reads_no_header_again(tmp_path):
    archive = tmp_path / "archive"
    n_files = sum(len(write_series(archive, f"s{i}", 5 + i, seed=i)) for i in range(3))
    store_path = tmp_path / "store"

    catalogued = catalog_here([archive], store_path)
    assert (catalogued.files_listed, catalogued.files_read, catalogued.files_unchanged) == (n_files, n_files, 0)
    catalog_runs = set(Store.open(store_path).rows("files", columns=["catalog_run"]).column("catalog_run").to_pylist())
    assert len(catalog_runs) == 1

    first = ingest_here([archive], store_path)  # the catalog has read every header: the ingest reads none
    assert first.catalog["files_read"] == 0 and first.catalog["files_unchanged"] == n_files
    assert first.n_embedded == first.n_found == n_files and first.n_skipped == 0

    again = ingest_here([archive], store_path)
    assert again.catalog["files_read"] == 0 and again.catalog["files_unchanged"] == n_files
    assert again.catalog["files_changed"] == again.catalog["files_gone"] == 0
    assert again.n_embedded == 0 and again.embedded_by_model[again.model_ids[0]] == 0
    assert again.n_skipped == again.n_found == n_files
    assert catalog_here([archive], store_path).files_read == 0

    assert_one_row_per_file(store_path, archive)
    store = Store.open(store_path)
    assert set(store.rows("files", columns=["catalog_run"]).column("catalog_run").to_pylist()) == catalog_runs
    assert_one_row_per_slice(store_path, n_files)


def test_changed_files_are_embedded_reported_and_consistent(tmp_path, monkeypatch, capsys):
    import pydicom
    from pydicom.uid import generate_uid

    archive = tmp_path / "archive"
    series = [write_series(archive, f"s{i}", 6, seed=i) for i in range(3)]
    store_path = tmp_path / "store"
    first = ingest_here([archive], store_path)
    assert first.n_embedded == 18
    model_id = first.model_ids[0]

    replaced = series[0][2]  # (a) another instance in its place: new SOPInstanceUID, other pixels, later mtime
    before = replaced.stat()
    ds = pydicom.dcmread(replaced)
    new_uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid
    ds.PixelData = (ds.pixel_array.astype(np.uint16) + 7).tobytes()
    ds.save_as(replaced, enforce_file_format=True)
    later = before.st_mtime_ns + 5_000_000_000
    os.utime(replaced, ns=(later, later))
    deleted = series[1][0]  # (b)
    deleted.unlink()
    added = write_series(archive, "s3", 5, seed=3)  # (c)

    second = ingest_here([archive], store_path)
    catalog = second.catalog
    assert catalog["files_listed"] == 18 - 1 + 5
    assert catalog["files_changed"] == 1 and catalog["files_gone"] == 1
    assert catalog["files_read"] == 1 + len(added)
    assert catalog["files_unchanged"] == 18 - 2
    assert second.embedded_by_model[model_id] == second.n_embedded == 1 + len(added)
    assert second.n_found == 22 and second.n_skipped == 22 - (1 + len(added))

    store = Store.open(store_path)
    embedded_now = set(keys_of(store, slices_table_name(model_id), f"run_id = '{second.run_id}'"))
    added_uids = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in added}
    assert embedded_now == {f"dicom:{uid}:0" for uid in added_uids | {new_uid}}
    row = store.rows("files", f"path = '{replaced}'").to_pylist()
    assert len(row) == 1 and row[0]["sop_uid"] == new_uid
    assert row[0]["mtime_ns"] == later and row[0]["catalog_run"] == second.run_id
    assert store.count("files", f"path = '{deleted}'") == 1  # gone files are counted, never deleted
    assert len(file_paths(store)) == len(set(file_paths(store))) == 18 + len(added)
    items = keys_of(store, "items")
    assert len(items) == len(set(items)) and embedded_now <= set(items)
    assert_check_is_clean(store_path, monkeypatch, capsys)


# ------------------------------------------------------------------------------------ grouping

def test_a_series_spread_over_folders_is_grouped_once(tmp_path, monkeypatch, capsys):
    """Slices 0,2,4,6 of one series in the first folder walked, 1,3,5,7 in the last, other series
    between. Read 4 headers at a time, the first folder's part is handed to the embedders before the
    last folder is read, so the series is reopened and embedded again whole."""
    archive = tmp_path / "archive"
    spread = samples.write_ct_series(tmp_path / "generated", n_slices=8, size=SIZE, seed=40, patient_id="SPREAD")
    moved = []
    for index, path in enumerate(spread):  # anatomical order: even slices first, odd ones last in walk order
        folder = archive / ("a_series" if index % 2 == 0 else "z_series_rest")
        folder.mkdir(parents=True, exist_ok=True)
        moved.append(Path(shutil.move(path, folder / path.name)))
    n_between = sum(len(write_series(archive, f"m{i}", 4, seed=50 + i)) for i in range(4))
    uid = series_uid_of(moved[0])
    assert uid == series_uid_of(moved[1])
    store_path = tmp_path / "store"

    summary = ingest_here([archive], store_path, header_batch=4)
    n_slices = 8 + n_between
    model_id = summary.model_ids[0]
    assert summary.n_found == n_slices and summary.n_failed == 0
    # the first half was embedded, dropped and embedded again with the rest
    assert summary.embedded_by_model[model_id] == n_slices + 4
    assert_one_row_per_slice(store_path, n_slices)

    store = Store.open(store_path)
    items = store.rows("items", f"series_uid = '{uid}' OR series_uid LIKE '{uid}#%'").to_pylist()
    assert len(items) == len({row["key"] for row in items}) == 8
    assert {row["series_uid"] for row in items} == {uid}
    by_z = sorted(items, key=lambda row: row["image_position"][2])
    assert [row["slice_index"] for row in by_z] == list(range(8))
    assert [row["path"] for row in by_z] == [str(path) for path in moved]
    vectors = store.rows(slices_table_name(model_id), f"series_uid = '{uid}' OR series_uid LIKE '{uid}#%'",
                         ["key", "series_uid", "slice_index"]).to_pylist()
    assert len(vectors) == 8
    assert sorted((row["key"], row["series_uid"], row["slice_index"]) for row in vectors) == \
        sorted((row["key"], row["series_uid"], row["slice_index"]) for row in items)
    series = store.rows("series", f"series_uid = '{uid}'").to_pylist()
    assert len(series) == 1 and series[0]["n_slices"] == 8
    assert_check_is_clean(store_path, monkeypatch, capsys)


# ------------------------------------------------------------------------------------ writers

@pytest.mark.slow
def test_three_concurrent_ingests_share_the_work(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "archive"
    n_slices = sum(len(write_series(archive, f"s{i:02d}", 20, seed=i)) for i in range(12))
    store_path = tmp_path / "store"
    outs = [tmp_path / f"out{n}.json" for n in range(3)]
    processes = [subprocess.Popen(
        embedstore_command("ingest", archive, "--store", store_path, "--weights", "random", "--image-size",
                           TEST_IMAGE_SIZE, "--no-patches", "--no-progress", "--workers", 0, "--header-workers", 0,
                           "--json", out),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outs]
    model_id, summaries = finished_ingests(processes, outs, store_path)
    embedded = [summary["embedded_by_model"][model_id] for summary in summaries]
    committed = [summary["committed_by_model"][model_id] for summary in summaries]
    # 240 slices are less than one work unit (UNIT_SLICES): whichever ingest plans first claims every
    # series; the others wait for its leases and embed nothing again.
    assert n_slices <= sum(embedded) <= 1.1 * n_slices, embedded
    assert sum(committed) == n_slices, committed
    assert all(summary["n_found"] == n_slices and summary["n_failed"] == 0 for summary in summaries)
    assert_one_row_per_slice(store_path, n_slices)
    assert_one_row_per_file(store_path, archive)
    assert not (store_path / LEASES_DIR).exists()
    assert_check_is_clean(store_path, monkeypatch, capsys)


SHARING_SCRIPT = """
import json, sys, time
from pathlib import Path
from tests.support import ingest_options
from embedstore.pipeline.ingest import ingest, load_models, check_options

source, store, ready, go, out = sys.argv[1:6]
options = ingest_options(keep_patches=False, header_workers=0, unit_slices=20)
models = load_models(options, check_options(options)[0])
Path(ready).touch()
while not Path(go).exists():  # the three ingests start together, their imports and models loaded
    time.sleep(0.01)
Path(out).write_text(json.dumps(ingest([source], store, options, loaded=models).to_dict()))
"""


@pytest.mark.slow
def test_concurrent_ingests_split_the_series_between_them(tmp_path, monkeypatch, capsys):
    """Units of 20 slices (one series): each ingest claims one series at a time, so three ingests
    started together each embed some of the archive, and no series twice."""
    archive = tmp_path / "archive"
    n_slices = sum(len(write_series(archive, f"s{i:02d}", 20, seed=i)) for i in range(12))
    store_path = tmp_path / "store"
    go, ready = tmp_path / "go", [tmp_path / f"ready{n}" for n in range(3)]
    outs = [tmp_path / f"out{n}.json" for n in range(3)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen([sys.executable, "-c", SHARING_SCRIPT, str(archive), str(store_path), str(mark),
                                   str(go), str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for mark, out in zip(ready, outs)]
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not all(mark.exists() for mark in ready) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.05)
    go.touch()
    model_id, summaries = finished_ingests(processes, outs, store_path)
    embedded = [summary["embedded_by_model"][model_id] for summary in summaries]
    assert n_slices <= sum(embedded) <= 1.1 * n_slices, embedded
    assert sum(1 for n in embedded if n > 0) >= 2, f"one ingest embedded everything: {embedded}"
    assert sum(summary["committed_by_model"][model_id] for summary in summaries) == n_slices
    assert_one_row_per_slice(store_path, n_slices)
    assert not (store_path / LEASES_DIR).exists()
    assert_check_is_clean(store_path, monkeypatch, capsys)


def test_a_dead_writers_series_are_taken_over(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "archive"
    series = [write_series(archive, f"s{i}", 4, seed=i) for i in range(3)]
    store_path = tmp_path / "store"
    Store.open(store_path, create=True)
    models = model_ids_for()
    write_lease(store_path, series_uid_of(series[0][0]), models, pid=dead_pid())  # same host, process gone
    write_lease(store_path, series_uid_of(series[1][0]), models, host="elsewhere", expires=time.time() - 1)

    with within(120):
        summary = ingest_here([archive], store_path)
    assert summary.n_embedded == summary.n_found == 12 and summary.n_skipped == 0
    assert_one_row_per_slice(store_path, 12)
    assert not (store_path / LEASES_DIR).exists()
    assert_check_is_clean(store_path, monkeypatch, capsys)


MODELS = ["model-a", "model-b"]


def test_lease_claims(tmp_path):
    store = Store.open(tmp_path / "store", create=True)
    book = LeaseBook(store, "my-run", MODELS)

    assert book.claim("fresh") is Claim.TAKEN
    assert book.claim("fresh") is Claim.TAKEN  # this run's own lease
    assert json.loads(book.path_of("fresh").read_text())["run_id"] == "my-run"

    write_lease(store.path, "live", MODELS)  # this test's own pid, another run, not done, not expired
    assert book.claim("live") is Claim.HELD
    write_lease(store.path, "elsewhere", MODELS, host="another-host", pid=dead_pid())  # its process cannot be asked
    assert book.claim("elsewhere") is Claim.HELD

    dead = write_lease(store.path, "dead", MODELS, pid=dead_pid())
    assert book.claim("dead") is Claim.TAKEN
    lease = json.loads(dead.read_text())
    assert (lease["run_id"], lease["pid"], lease["done"]) == ("my-run", os.getpid(), False)
    assert LeaseBook(store, "third-run", MODELS).claim("dead") is Claim.HELD  # taken over: held by this live run

    write_lease(store.path, "done", MODELS, done=True)
    assert book.claim("done") is Claim.DONE
    write_lease(store.path, "expired", MODELS, expires=time.time() - 1)
    assert book.claim("expired") is Claim.TAKEN
    write_lease(store.path, "expired-elsewhere", MODELS, host="another-host", expires=time.time() - 1)
    assert book.claim("expired-elsewhere") is Claim.TAKEN

    torn = book.path_of("torn")
    torn.write_text('{"run_id": "x", "ho')
    assert book.claim("torn") is Claim.HELD  # being written by the writer that just made it
    os.utime(torn, (time.time() - 60, time.time() - 60))
    assert book.claim("torn") is Claim.TAKEN  # a writer killed while writing it

    book.finish(["fresh"])
    assert LeaseBook(store, "fourth-run", MODELS).claim("fresh") is Claim.DONE  # its writer is alive
    assert LeaseBook(store, "fourth-run", ["another-model"]).claim("fresh") is Claim.TAKEN  # other models
    write_lease(store.path, "done-by-the-dead", MODELS, done=True, pid=dead_pid())
    assert book.claim("done-by-the-dead") is Claim.TAKEN  # its writer ended: the store says what is done


def test_done_leases_left_by_a_killed_ingest_hide_nothing_from_a_later_one(tmp_path, monkeypatch, capsys):
    """A SIGKILLed ingest leaves leases/ behind, its committed series marked done. A later ingest
    with another model must still embed those series: done means "this model's rows are committed"
    to the writers of that run, not "nothing to do" to every run after it."""
    archive = tmp_path / "archive"
    series = [write_series(archive, f"s{i}", 4, seed=i) for i in range(2)]
    store_path = tmp_path / "store"
    first = ingest_here([archive], store_path, seed=0)
    for paths in series:  # what a killed run of the first model left
        write_lease(store_path, series_uid_of(paths[0]), first.model_ids, run_id="killed-run", pid=dead_pid(),
                    done=True)

    other_model = ingest_here([archive], store_path, seed=1)  # random weights of another seed: another model
    model_id = other_model.model_ids[0]
    assert len(Store.open(store_path).specs()) == 2
    assert other_model.embedded_by_model[model_id] == 8, other_model.embedded_by_model
    vectors = keys_of(Store.open(store_path), slices_table_name(model_id))
    assert len(vectors) == len(set(vectors)) == 8
    assert not (store_path / LEASES_DIR).exists()
    assert_check_is_clean(store_path, monkeypatch, capsys)


# ------------------------------------------------------------------------------------ killed catalogs

@pytest.mark.slow
def test_a_killed_catalog_resumes_where_it_stopped(tmp_path):
    """The local catalog commits the driver's rows every COMMIT_FILES files (whatever --header-batch
    says), so the archive is larger than one commit: the kill falls between the first and the last."""
    from embedstore.catalog.scan import COMMIT_FILES

    total = COMMIT_FILES + max(2000, COMMIT_FILES // 2)
    archive = link_archive(tmp_path / "archive", total)
    store_path = tmp_path / "store"
    command = embedstore_command("catalog", archive, "--store", store_path, "--header-workers", 0,
                                 "--header-batch", 20, "--no-progress")
    present = kill_when_partly_catalogued(command, store_path, total, tmp_path)
    assert 0 < present < total

    rerun = catalog_here([archive], store_path)
    assert rerun.files_listed == total
    assert rerun.files_read == total - present and rerun.files_unchanged == present
    assert rerun.files_changed == rerun.files_gone == rerun.files_failed == 0
    assert_one_row_per_file(store_path, archive)


# ------------------------------------------------------------------------------------ Ray

def catalogued(store_path: Path) -> list[tuple]:
    rows = Store.open(store_path).rows("files", columns=["path", "sop_uid", "series_uid", "positions"]).to_pylist()
    return sorted((row["path"], row["sop_uid"], row["series_uid"], json.dumps(row["positions"])) for row in rows)


@pytest.mark.slow
def test_ray_reads_headers_as_tasks(tmp_path):
    ray = pytest.importorskip("ray")
    archive = tmp_path / "archive"
    total = sum(len(write_series(archive, f"s{i:02d}", 30, seed=i)) for i in range(10))
    try:
        on_ray = catalog_here([archive], tmp_path / "ray", executor="ray", chunk_files=50, header_workers=None)
    finally:
        ray.shutdown()
    local = catalog_here([archive], tmp_path / "local")
    assert on_ray.files_read == local.files_read == total and on_ray.files_failed == 0
    assert on_ray.executor == "ray" and on_ray.header_tasks >= 2
    readers = Store.open(tmp_path / "ray").rows("files", columns=["reader"]).column("reader").to_pylist()
    pids = {reader.rsplit(":", 1)[1] for reader in readers}
    assert str(os.getpid()) not in pids and pids
    assert catalogued(tmp_path / "ray") == catalogued(tmp_path / "local")
    assert_one_row_per_file(tmp_path / "ray", archive)


@pytest.mark.slow
def test_a_killed_ray_catalog_resumes_where_it_stopped(tmp_path):
    pytest.importorskip("ray")
    archive = tmp_path / "archive"
    total = sum(len(write_series(archive, f"s{i:02d}", 30, seed=i)) for i in range(10))
    store_path = tmp_path / "store"
    command = embedstore_command("catalog", archive, "--store", store_path, "--executor", "ray",
                                 "--header-batch", 20, "--header-workers", 1, "--no-progress")
    present = kill_when_partly_catalogued(command, store_path, total, tmp_path)
    assert 0 < present < total

    rerun = catalog_here([archive], store_path)
    assert rerun.files_read == total - present and rerun.files_unchanged == present
    assert_one_row_per_file(store_path, archive)


def test_two_catalogs_of_one_new_archive_leave_one_row_per_file(tmp_path):
    """A scan appends the rows of files new at listing while nobody else has written the table; the
    second scan listed the same new files, finds the table moved on, and merges instead."""
    from embedstore.catalog.reading import HeaderSettings
    from embedstore.catalog.rows import RowSettings
    from embedstore.catalog.scan import CatalogOptions, CatalogScan
    from embedstore.pipeline.catalog_job import open_for_writing

    archive = tmp_path / "archive"
    for i in range(2):
        write_series(archive, f"s{i}", 6, seed=i)
    store_path = tmp_path / "store"
    catalog_here([archive / "s0"], store_path)
    store, key = open_for_writing(store_path, False)
    settings = HeaderSettings("axial", 10**8, RowSettings("run", key))
    first, second = (CatalogScan(store, [archive], CatalogOptions(header_workers=0), settings) for _ in range(2))
    first.list()
    second.list()
    assert first.comparison.n_new == second.comparison.n_new == 6
    first.read()
    second.read()
    assert_one_row_per_file(store_path, archive)
