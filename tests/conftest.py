"""Shared fixtures: a generated mixed archive and a store ingested from it with random weights; the
helpers they use are in tests/support.py.

Worker processes use the spawn start method and re-import test modules: keep module level free of
side effects.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import (
    IngestedStore,
    MixedArchive,
    PatientArchive,
    ingest_options,
    make_mixed_archive,
    make_patient_archive,
)


@pytest.fixture(scope="session")
def mixed_archive(tmp_path_factory) -> MixedArchive:
    return make_mixed_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="session")
def ingested(mixed_archive, tmp_path_factory) -> IngestedStore:
    """The mixed archive ingested once; tests that change a store work on `fresh_copy` of it."""
    from embedstore.pipeline.ingest import ingest

    path = tmp_path_factory.mktemp("stores") / "store"
    summary = ingest([mixed_archive.root], path, ingest_options(batch_size=4))
    return IngestedStore(path, summary, mixed_archive)


@pytest.fixture
def fresh_copy(ingested, tmp_path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(ingested.path, target)
    return target


@pytest.fixture(scope="session")
def patient_store(tmp_path_factory) -> tuple[Path, PatientArchive]:
    """A store of one patient's CT, radiographs and photos, ingested with random weights."""
    from embedstore.pipeline.ingest import ingest

    archive = make_patient_archive(tmp_path_factory.mktemp("patient"))
    path = tmp_path_factory.mktemp("served") / "store"
    ingest([archive.root], path, ingest_options())
    return path, archive
