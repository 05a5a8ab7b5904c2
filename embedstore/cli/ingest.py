"""`embedstore ingest`: every slice under the sources embedded into the store."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from embedstore.cli.options import check_output, parse_numbers
from embedstore.cli.render import print_catalog, print_summary
from embedstore.errors import UsageError
from embedstore.sources.limits import DEFAULT_MAX_PIXELS

HEADER_WORKERS = typer.Option(None, help="Processes reading headers (Ray: tasks at once); 0 reads in this process. "
                              "Default: every core.")
HEADER_BATCH = typer.Option(None, help="Files per header-reading task. Default: 256 locally, 2048 on Ray.")
SOURCES = typer.Argument(..., metavar="SRC...", help="Files or directories (searched recursively), a PACS's "
                         "DICOMweb service (dicomweb+http(s)://HOST/PATH) or a bucket (s3://BUCKET/PREFIX).")
QUERY = typer.Option(None, help="QIDO filters for DICOMweb sources, KEYWORD=VALUE&... (e.g. "
                     "'ModalitiesInStudy=CT&StudyDate=20240101-20241231'; series attributes such as Modality "
                     "narrow the series).")
TOKEN = typer.Option(None, help="Bearer token for DICOMweb sources (or set EMBEDSTORE_DICOMWEB_TOKEN; basic auth: "
                     "EMBEDSTORE_DICOMWEB_USER and EMBEDSTORE_DICOMWEB_PASSWORD). Never stored.")


def use_token(token: str | None) -> None:
    """The token goes to the environment, where this process's requests and its workers' find it:
    never into an option the store records."""
    from embedstore.sources.dicomweb import TOKEN_ENV  # here: the CLI's import stays light

    if token:
        os.environ[TOKEN_ENV] = token


def ingest(
    sources: list[str] = SOURCES,
    store: str = typer.Option(..., "--store", help="Store directory, or s3://BUCKET/PREFIX (created if missing)."),
    model: list[str] = typer.Option(
        ["dinov2_vits14"], "--model", metavar="NAME", help="dinov2_vit{s,b,l,g}14[_reg] or any timm model name; "
        "repeat it to embed every slice with several models (each slice is decoded once)."),
    weights: str = typer.Option("hub", help="hub, random, or a checkpoint path (Meta .pth or timm file)."),
    image_size: int = typer.Option(224, help="Model input size; a multiple of the patch size (14)."),
    layers: Optional[int] = typer.Option(
        None, help="Keep the final-norm CLS token of the last N blocks (default 4 on ViTs) beside cls and patch_mean."),
    patch_layers: Optional[str] = typer.Option(
        None, help="Blocks whose patch tokens go to Zarr, comma-separated, negative from the end (default -1, "
        "the last; -5,-4,-3,-2,-1 for a UNet decoder)."),
    patches: bool = typer.Option(True, "--patches/--no-patches", help="Keep patch tokens in Zarr."),
    mean: Optional[str] = typer.Option(None, help="Input mean R,G,B instead of the model's pretrained_cfg."),
    std: Optional[str] = typer.Option(None, help="Input std R,G,B instead of the model's pretrained_cfg."),
    window: str = typer.Option(
        "auto", help="auto (CT [-1024, 600], MR percentiles, X-ray VOI), header (the file's own VOI window), "
        "a CT preset (study, brain, subdural, stroke, lung, mediastinum, abdomen, liver, bone), multi (three CT "
        "windows as channels, by body part) or multi:W1,W2,W3."),
    mr_percentiles: str = typer.Option("5,95", help="MR: per-slice clip percentiles LOW,HIGH."),
    axis: str = typer.Option("axial", help="NIfTI slicing axis: axial, coronal or sagittal."),
    modality: Optional[str] = typer.Option(
        None, help="Modality of NIfTI and raster sources: CT, MR, CR, DX, MG, US, PT, NM, XA or OT (stored per "
        "slice; sets the intensity rule). Default: NIfTI inferred (CT or MR), rasters none. DICOM keeps its own."),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS, help="Most values a frame, page or slice may declare (x samples for colour); larger "
        "files are too_large, refused from their header before any decoding."),
    keep_patient_id: bool = typer.Option(
        False, "--keep-patient-id", help="Store PatientID as read. Default: a keyed hash (see README)."),
    batch_size: int = typer.Option(32, help="Slices per model batch."),
    workers: Optional[int] = typer.Option(
        None, help="Decode worker processes; 0 decodes inline. Default: up to 8 with CUDA, cores/8 on CPU."),
    header_workers: Optional[int] = HEADER_WORKERS,
    header_batch: Optional[int] = HEADER_BATCH,
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    preprocess_on: str = typer.Option(
        "auto", help="Where intensity mapping and resize run: workers (the decode processes), device (batched on "
        "the model's device; the workers only decode) or auto (device on CUDA, workers on CPU)."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    engine: str = typer.Option("auto", help="auto (tensorrt → compile → eager on CUDA; eager on CPU), eager, compile "
                               "or tensorrt; a compiled engine must match eager (cosine ≥ 0.999) or gives way."),
    seed: int = typer.Option(0, help="Seed for --weights random."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Drop this model's rows and rebuild."),
    executor: str = typer.Option("local", help="local (this process and its decode workers) or ray."),
    ray_address: Optional[str] = typer.Option(
        None, help="Join this Ray cluster (implies --executor ray); without it Ray starts a local one."),
    ray_actors: Optional[int] = typer.Option(None, help="Embedding actors on Ray. Default: one per GPU, else one."),
    query: Optional[str] = QUERY,
    token: Optional[str] = TOKEN,
    json_out: Optional[Path] = typer.Option(None, "--json", "-o", help="Also write the run summary as JSON here."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="Show the phase and a progress bar on stderr while it runs."),
) -> None:
    """Embed every slice under SRC into STORE; reruns embed only what is missing."""
    from embedstore.pipeline.ingest import IngestOptions
    from embedstore.pipeline.ingest import ingest as run_ingest

    options = IngestOptions(
        models=tuple(model), weights=weights, image_size=image_size, seed=seed, layers=layers,
        patch_layers=parse_numbers(patch_layers, "--patch-layers", int) if patch_layers else None,
        mean=parse_numbers(mean, "--mean") if mean else None, std=parse_numbers(std, "--std") if std else None,
        keep_patches=patches, window=window, mr_percentiles=parse_percentiles(mr_percentiles), axis=axis,
        modality=modality, max_pixels=max_pixels, keep_patient_id=keep_patient_id,
        executor="ray" if ray_address else executor, ray_address=ray_address, ray_actors=ray_actors,
        batch_size=batch_size, workers=workers, device=device, preprocess_on=preprocess_on, engine=engine,
        precision=precision, overwrite=overwrite, show_progress=progress, header_workers=header_workers,
        header_batch=header_batch, query=query,
    )
    check_output(json_out, "--json")
    use_token(token)
    summary = run_ingest(sources, store, options)
    print_summary(summary)
    if json_out:
        json_out.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")


def catalog(
    sources: list[str] = SOURCES,
    store: str = typer.Option(..., "--store", help="Store directory, or s3://BUCKET/PREFIX (created if missing)."),
    axis: str = typer.Option("axial", help="NIfTI slicing axis the slices are counted along."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, help="Most values a frame may declare; larger files are "
                                   "too_large."),
    keep_patient_id: bool = typer.Option(
        False, "--keep-patient-id", help="Store PatientID as read. Default: a keyed hash (see README)."),
    header_workers: Optional[int] = HEADER_WORKERS,
    header_batch: Optional[int] = HEADER_BATCH,
    executor: str = typer.Option("local", help="local (this machine's cores) or ray (Ray tasks on every node)."),
    ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster (implies --executor ray)."),
    query: Optional[str] = QUERY,
    token: Optional[str] = TOKEN,
    json_out: Optional[Path] = typer.Option(None, "--json", "-o", help="Also write the catalog summary as JSON here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Say what it is doing on stderr."),
) -> None:
    """Read every header under SRC into STORE's files table, embedding nothing; reruns read only new
    and changed files."""
    from embedstore.catalog.scan import CatalogOptions
    from embedstore.pipeline.catalog_job import catalog_archive

    options = CatalogOptions(axis, max_pixels, header_workers, "ray" if ray_address else executor, header_batch)
    check_output(json_out, "--json")
    use_token(token)
    summary = catalog_archive(sources, store, options, keep_patient_id, ray_address, progress, query)
    print_catalog(summary.to_dict())
    if json_out:
        json_out.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")


def parse_percentiles(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--mr-percentiles takes LOW,HIGH (e.g. 5,95), not {text!r}") from None
    return low, high
