"""`embedstore demo`: the main job end to end on a generated sample archive, on any machine."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from embedstore.errors import UsageError
from embedstore.pipeline.ingest import IngestOptions, IngestSummary, ingest
from embedstore.models import LoadedModel, load_model
from embedstore.search.similar import Hit, nearest_slices
from embedstore.samples import build_sample_archive
from embedstore.store import Store, check_store_writable
from embedstore.store.info import store_info

DEMO_MODEL = "dinov2_vits14"


def demo_model(say: Callable[[str], None]) -> LoadedModel:
    """Pretrained DINOv2 when the hub can be reached, else seeded random weights, said plainly."""
    try:
        return load_model(DEMO_MODEL, "hub")
    except UsageError as error:
        say(f"No pretrained weights ({error}).")
        say("The demo goes on with RANDOM weights: the pipeline is real, the similarities are not meaningful.")
        return load_model(DEMO_MODEL, "random")


def run_demo(directory: Path, say: Callable[[str], None] = print,
             show_progress: bool = True) -> tuple[IngestSummary, dict, list[Hit], str, str]:
    """Everything goes under `directory`: the sample archive to directory/archive, the store to
    directory/store (a rerun reuses both)."""
    archive, store_path = directory / "archive", directory / "store"
    check_store_writable(store_path)
    if not archive.exists():
        say(f"Writing a sample archive to {archive} (pydicom's CT/MR files, a CT series, a multi-frame MR, "
            f"PNG phantoms, a NIfTI volume)")
        build_sample_archive(archive)
    loaded = demo_model(say)
    options = IngestOptions(models=(DEMO_MODEL,), weights=loaded.weights_source, show_progress=show_progress)
    summary = ingest([archive], store_path, options, loaded=[loaded])
    store = Store.open(store_path)
    query = store.rows("items", "modality = 'CT' AND path LIKE '%ct_series%' AND slice_index = 5", ["key"])
    query_key = query.column("key")[0].as_py()
    # A randomly initialised DINOv2 scales every block by LayerScale 1e-5, so its CLS token barely
    # depends on the image; the patch-token mean still does, and makes a more telling lookup.
    feature = "patch_mean" if loaded.weights_source == "random" else "cls"
    return summary, store_info(store), nearest_slices(store, query_key, k=5, feature=feature), query_key, feature
