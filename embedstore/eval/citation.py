"""What makes a result citable: the labels record (file, digest, join, splits, classes) and its
warnings, the model spec, the embedstore version and when it was computed, in every result's JSON."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone

from embedstore.eval.labels import LabelsRecord
from embedstore.models.spec import ModelSpec
from embedstore.version import __version__


def cite(result, spec: ModelSpec, record: LabelsRecord | None = None):
    """`result` with its provenance filled in; the labels' warnings come first among its warnings."""
    result.provenance = {"embedstore_version": __version__,
                         "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "model_spec": spec.to_row()}
    if record is not None:
        result.labels = asdict(record)
        result.warnings = record.warnings() + result.warnings
    return result
