"""A summary of what a store holds, for `embedstore info`."""

from __future__ import annotations

from collections import Counter

from embedstore.errors import REASONS, UsageError
from embedstore.store import Store, directory_bytes, sql_literal
from embedstore.store.schema import slices_table_name


def _counts(values) -> dict[str, int]:
    return dict(Counter("(none)" if v is None else v for v in values).most_common())


def model_counts(store: Store) -> dict[str, dict]:
    """Per model: its spec's essentials and how many slices, series, studies and patients it covers."""
    models = {}
    for model_id, spec in store.specs().items():
        slices = store.rows(slices_table_name(model_id), columns=["study_uid", "series_uid", "patient_id"])
        models[model_id] = {
            "name": spec.name, "embed_dim": spec.embed_dim, "image_size": spec.image_size,
            "weights": spec.weights_tag, "cls_layers": list(spec.cls_layers), "patch_layers": list(spec.patch_layers),
            "slices": slices.num_rows,
            "series": len(set(slices.column("series_uid").to_pylist())) if slices.num_rows else 0,
            "studies": len(set(slices.column("study_uid").to_pylist())) if slices.num_rows else 0,
            "patients": len({p for p in slices.column("patient_id").to_pylist() if p}) if slices.num_rows else 0,
        }
    return models


def store_info(store: Store) -> dict:
    tables = {name: store.count(name) for name in store.table_names()}
    items = store.rows("items", columns=["modality", "study_uid", "series_uid"])
    failures = store.rows("failures", columns=["reason"])
    series = store.rows("series", columns=["n_missing_slices", "uneven_spacing"])
    runs = store.rows("runs", columns=["run_id", "model_ids", "started_at", "ended_at", "n_embedded",
                                       "n_skipped", "n_failed", "slices_per_s"])
    last_run = runs.sort_by([("started_at", "descending")]).slice(0, 1).to_pylist() if runs.num_rows else []
    for run in last_run:
        for key in ("started_at", "ended_at"):
            run[key] = run[key].isoformat() if run[key] else None
    return {
        "store": str(store.path),
        "format_version": store.manifest["format_version"],
        "tables": tables,
        "models": model_counts(store),
        "slices": items.num_rows,
        "modalities": _counts(items.column("modality").to_pylist()) if items.num_rows else {},
        "series": len(set(items.column("series_uid").to_pylist())) if items.num_rows else 0,
        "studies": len(set(items.column("study_uid").to_pylist())) if items.num_rows else 0,
        "patch_bytes": directory_bytes(store.patches_root),
        "orphan_shards": len(store.orphan_shards()),
        "ingest_running": store.ingest_running(),
        "failures_by_reason": _counts(failures.column("reason").to_pylist()) if failures.num_rows else {},
        "series_with_missing_slices": sum(n > 0 for n in series.column("n_missing_slices").to_pylist())
        if series.num_rows else 0,
        "series_with_uneven_spacing": sum(series.column("uneven_spacing").to_pylist()) if series.num_rows else 0,
        "last_run": last_run[0] if last_run else None,
    }


def list_failures(store: Store, reason: str | None = None) -> list[dict]:
    """Failure rows, oldest first, optionally of one reason code."""
    if reason is not None and reason not in REASONS:
        raise UsageError(f"unknown failure reason {reason!r}: use one of {', '.join(REASONS)}")
    rows = store.rows("failures", f"reason = {sql_literal(reason)}" if reason else None)
    failures = sorted(rows.to_pylist(), key=lambda row: (row["time"], row["path"]))
    for row in failures:
        row["time"] = row["time"].isoformat()
    return failures
