"""`embedstore serve`: a FastAPI application over one store, and the web page that shows its results.

Routes (OpenAPI at /docs and /openapi.json):
  GET  /api/models                 the store's models (the first is the default)
  GET  /api/facets                 modalities, body parts and the date range, for the page's filters
  POST /api/uploads?filename=F     an image file as the request body: embedded once per model, kept
                                   for the searches that name its upload_id
  POST /api/search                 by key, series_uid, study_uid or upload_id; k, level, model, feature, where
                                   with box (on key): the regions most like it, each with its box
  GET  /api/items/{key}            GET /api/series/{uid}            GET /api/studies/{uid}
  GET  /thumbnails/{key}.png       the slice as its model saw it, 256 px on the long side
  GET  /                           the page (static/), which calls the routes above

Everything is read through the store's own code (search.similar, the ingest's readers and decode).
Only the fields in `public.ITEM_FIELDS` and ids from `public.PublicIds` leave the service. With a
token every /api and /thumbnails request must carry `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import numpy as np
import pyarrow as pa
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from embedstore.errors import InputError, StoreDamagedError, UsageError
from embedstore.search import regions, similar
from embedstore.search.degenerate import stored_feature_warning
from embedstore.search.where import validated_where
from embedstore.serve.public import FILTER_COLUMNS, ITEM_FIELDS, PublicIds
from embedstore.serve.responses import (
    FacetsResponse,
    ItemResponse,
    Member,
    ModelInfo,
    ModelsResponse,
    SearchPlanInfo,
    SearchResponse,
    SearchResult,
    SeriesResponse,
    SeriesSummary,
    StudyResponse,
    StudySeries,
    UploadResponse,
)
from embedstore.serve.thumbnails import ThumbnailCache
from embedstore.sources.discover import check_input_file, kind_by_name
from embedstore.sources.limits import UPLOAD_MAX_PIXELS
from embedstore.store import Store, among, equals
from embedstore.store.location import is_object_store, local_folder, store_root
from embedstore.store.schema import series_table_name, slices_table_name
from embedstore.store.upgrade import check_item_columns
from embedstore.store.vectors import feature_columns
from embedstore.version import __version__

STATIC = Path(__file__).parent / "static"
STRIP_LENGTH = 6  # slices shown for a series or study result
UPLOADS_KEPT = 8  # embedded uploads kept for further searches (each up to --max-upload-mb)
READ_CHUNK = 1 << 20
STORED_QUERIES = ("key", "series_uid", "study_uid")  # searches by what the store holds (and uploads)
SERIES_FIELDS = tuple(name for name in ITEM_FIELDS if name != "slice_index")  # what a series row shows of them


@dataclass(frozen=True)
class ServeSettings:
    store: str | Path
    token: str | None = None
    show_paths: bool = False
    max_upload_mb: float = 50.0
    max_pixels: int = UPLOAD_MAX_PIXELS  # per uploaded frame, refused from the header before decoding
    cache_folder: Path | None = None  # default: <store>.serve-cache beside the store

    def __post_init__(self):
        if self.max_upload_mb <= 0 or self.max_pixels < 1:
            raise UsageError("--max-upload-mb and --max-pixels must be positive")


def cache_folder_for(store: str | Path) -> Path:
    """Where the service keeps its thumbnails: beside a local store; for a store in object storage,
    in the user's local cache."""
    if is_object_store(store):
        return local_folder(store_root(store), "serve-cache")
    store = Path(store).resolve()
    return store.parent / f"{store.name}.serve-cache"


class SearchRequest(BaseModel):
    key: str | None = Field(None, description="a slice's key, as a result shows it")
    series_uid: str | None = None
    study_uid: str | None = None
    upload_id: str | None = Field(None, description="from POST /api/uploads")
    k: int = Field(10, ge=1, le=1000)
    level: Literal["slice", "series", "study"] = "slice"
    model: str | None = Field(None, description="a model id or unique prefix; the first model when absent")
    feature: str | None = Field(None, description="cls, patch_mean, clsN or cls/clsN+patch_mean; the model's "
                                "default_feature (GET /api/models) when absent")
    where: str | None = Field(None, description="filter on " + ", ".join(FILTER_COLUMNS)
                              + ", e.g. \"modality = 'CT' AND study_date >= '2020-01-01'\"")
    box: list[int] | None = Field(None, min_length=4, max_length=4, description="region search: X0, Y0, X1, Y1 "
                                  "on the `key` slice, in its own pixels (columns then rows, the ends exclusive)")
    per_slice: int = Field(1, ge=1, le=100, description="region search: most regions from one slice")
    score: Literal["window", "late"] = Field("window", description="region search: how a region is scored")
    block: int | None = Field(None, description="region search: the stored block; the last stored when absent")


@dataclass
class Upload:
    data: bytes
    suffix: str  # what selects the reader, as in an ingest
    vectors: dict[str, dict[str, np.ndarray]]  # model id → stored-column name → (slices, D)


def upload_suffix(filename: str) -> str:
    """The suffix of an uploaded file's name that selects its reader (.nii.gz, .dcm, ...), or none."""
    suffix = "".join(Path(filename).suffixes[-2:]).lower()
    return suffix if suffix.replace(".", "").isalnum() and len(suffix) <= 12 else ""


def upload_id_of(data: bytes, suffix: str) -> str:
    """Uploads are kept by what decides their vectors: the bytes and the reader the name selects
    (the same bytes as .png and as .dcm are two uploads)."""
    reader = kind_by_name(f"upload{suffix}") or "by-content"
    return "upload:" + hashlib.sha256(reader.encode() + b"\0" + data).hexdigest()[:32]


def json_safe(value):
    """A validation error's details with non-finite numbers as text: JSON has no NaN or Infinity,
    and a request's `"k": NaN` must be answered with a 422, not fail while being answered."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


class Service:
    """The store, its public ids, thumbnails, loaded models and recent uploads, shared by the routes."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.store = Store.open(settings.store)
        check_item_columns(self.store)  # thumbnails read slices back by their kind and axis
        cache = settings.cache_folder or cache_folder_for(settings.store)
        self.ids = PublicIds(self.store, cache, settings.show_paths)
        self.thumbnails = ThumbnailCache(cache / "thumbnails")
        self.uploads: OrderedDict[str, Upload] = OrderedDict()
        self.models: dict[str, object] = {}
        self.default_features: dict[str, tuple[str, str | None]] = {}
        self.lock = threading.Lock()  # uploads and models; one embedding at a time keeps memory bounded

    # ------------------------------------------------------------------ identifiers and messages
    def stored_or_404(self, public_id: str, what: str) -> str:
        stored = self.ids.stored(public_id)
        if stored is None:
            raise HTTPException(404, f"no {what} {public_id!r} in this store")
        return stored

    def message(self, error: Exception) -> str:
        """An error's text without the store's location (its folder names are not the client's business)."""
        text = str(error)
        path = self.store.path
        locations = [str(path)] if is_object_store(path) else [str(path.resolve()), str(path)]
        for location in locations:
            text = text.replace(f" in store {location}", "").replace(location, "the store")
        return text

    def thumbnail_url(self, key: str, model_id: str) -> str:
        return f"/thumbnails/{quote(self.ids.public(key), safe='')}.png?model={quote(model_id, safe='')}"

    def model_id(self, prefix: str | None) -> str:
        """The model a prefix names; the store's first model when none is named (the page's default)."""
        try:
            return self.store.resolve_model_id(prefix) if prefix else next(iter(self.store.specs()))
        except StopIteration:
            raise HTTPException(404, "this store holds no embeddings yet") from None
        except UsageError as error:
            raise HTTPException(400, self.message(error)) from None

    def default_feature(self, model_id: str) -> tuple[str, str | None]:
        """The feature searches use when none is named, and why when it is not cls: cls, unless its
        stored vectors are degenerate (random weights: every score 1.0000), then patch_mean."""
        if model_id not in self.default_features:
            warning = stored_feature_warning(self.store, model_id, "cls")
            if warning and not stored_feature_warning(self.store, model_id, "patch_mean"):
                note = ("patch mean by default: this model's CLS vectors are all alike (random weights?), so "
                        "every CLS score would be 1.0000")
                self.default_features[model_id] = ("patch_mean", note)
            else:
                self.default_features[model_id] = ("cls", None)
        return self.default_features[model_id]

    # ------------------------------------------------------------------ search
    def query(self, request: SearchRequest, model_id: str, feature: str) -> similar.Query:
        given = [name for name in (*STORED_QUERIES, "upload_id") if getattr(request, name)]
        if len(given) != 1:
            raise HTTPException(400, f"give exactly one of {', '.join(STORED_QUERIES)}, upload_id")
        try:
            feature_columns(self.store.spec(model_id), feature)
        except UsageError as error:
            raise HTTPException(400, self.message(error)) from None
        if request.upload_id:
            return similar.query_by_vectors(self.store, "an upload", model_id,
                                            self.upload_vectors(request.upload_id, model_id), feature)
        name = given[0]
        stored = self.stored_or_404(getattr(request, name), name.replace("_", " "))
        try:  # the one dispatch the command line and the Python API use too
            return similar.query_for(self.store, {name: (name, stored)}, feature, model_id)
        except UsageError as error:
            raise HTTPException(404, self.message(error).replace(stored, getattr(request, name))) from None

    def search(self, request: SearchRequest) -> SearchResponse:
        model_id = self.model_id(request.model)
        if request.box is not None:
            return self.region_search(request, model_id)
        feature = request.feature or self.default_feature(model_id)[0]
        query = self.query(request, model_id, feature)
        table = series_table_name(model_id) if request.level == "series" else slices_table_name(model_id)
        try:
            where = validated_where(request.where, self.filter_schema(table)) if request.where else None
            hits = similar.search(self.store, query, request.k, request.level, feature, where)
        except UsageError as error:
            raise HTTPException(400, self.message(error)) from None
        strips = self.strips(hits, request.level)
        return SearchResponse(model_id=model_id, level=request.level, feature=feature, where=where,
                              plan=SearchPlanInfo(**hits.plan.to_dict()), box=None,
                              results=[self.result(hit, model_id, strips.get(hit.key)) for hit in hits])

    def region_search(self, request: SearchRequest, model_id: str) -> SearchResponse:
        """The regions most like a box on a stored slice, each result with its matched box."""
        if not request.key or any(getattr(request, name) for name in ("series_uid", "study_uid", "upload_id")):
            raise HTTPException(400, "a box is drawn on one stored slice: give it with key alone")
        stored = self.stored_or_404(request.key, "key")
        table = slices_table_name(model_id)
        try:
            where = validated_where(request.where, self.filter_schema(table)) if request.where else None
            query = regions.region_query_by_key(self.store, stored, regions.Box(*request.box), model_id, request.block)
            hits = regions.search_regions(self.store, query, request.k, where, request.level, request.per_slice,
                                          request.score)
        except UsageError as error:
            raise HTTPException(400, self.message(error).replace(stored, request.key)) from None
        return SearchResponse(model_id=model_id, level=request.level, feature=f"patch tokens of block {query.block}",
                              where=where, plan=SearchPlanInfo(**hits.plan.to_dict()), box=list(query.box.as_tuple()),
                              results=[self.region_result(hit, model_id) for hit in hits])

    def region_result(self, hit: regions.RegionHit, model_id: str) -> SearchResult:
        return SearchResult(
            rank=hit.rank, score=hit.score, level=hit.level, key=self.ids.public(hit.key),
            series_uid=self.ids.public(hit.series_uid), study_uid=self.ids.public(hit.study_uid),
            **{name: getattr(hit, name) for name in ITEM_FIELDS}, n_slices=None, n_series=None,
            thumbnail=self.thumbnail_url(hit.key, model_id), strip=[], box=list(hit.box), rows=hit.rows,
            cols=hit.cols, **self.shown_path(hit.path))

    def filter_schema(self, table: str) -> pa.Schema:
        schema = self.store.schema(table)
        return pa.schema([field for field in schema if field.name in FILTER_COLUMNS])

    def result(self, hit: similar.Hit, model_id: str, strip: list[str] | None) -> SearchResult:
        keys = [hit.key] if hit.level == "slice" else strip or []
        return SearchResult(
            rank=hit.rank, score=hit.similarity, level=hit.level, key=self.ids.public(hit.key),
            series_uid=self.ids.public(hit.series_uid), study_uid=self.ids.public(hit.study_uid),
            **{name: getattr(hit, name) for name in ITEM_FIELDS}, n_slices=hit.n_slices, n_series=hit.n_series,
            thumbnail=self.thumbnail_url(keys[len(keys) // 2], model_id) if keys else None,
            strip=[self.thumbnail_url(key, model_id) for key in keys] if hit.level != "slice" else [],
            **self.shown_path(hit.path))

    def shown_path(self, path: str) -> dict:
        """The `path` field, only with --show-paths (absent, not null, otherwise)."""
        return {"path": path} if self.settings.show_paths else {}

    def strips(self, hits: list[similar.Hit], level: str) -> dict[str, list[str]]:
        """For series and study results: up to STRIP_LENGTH slice keys each, evenly spread in slice order."""
        if level == "slice" or not hits:
            return {}
        column = "series_uid" if level == "series" else "study_uid"
        members = self.store.rows("items", among(column, [hit.key for hit in hits]),
                                  ["key", "study_uid", "series_uid", "slice_index"]).to_pylist()
        grouped: dict[str, list[dict]] = {}
        for row in members:
            grouped.setdefault(row[column], []).append(row)
        strips = {}
        for owner, rows in grouped.items():
            rows.sort(key=lambda row: (row["series_uid"], row["slice_index"]))
            picks = np.unique(np.linspace(0, len(rows) - 1, min(STRIP_LENGTH, len(rows))).round().astype(int))
            strips[owner] = [rows[i]["key"] for i in picks]
        return strips

    # ------------------------------------------------------------------ uploads
    def add_upload(self, data: bytes, filename: str, model_id: str) -> UploadResponse:
        suffix = upload_suffix(filename)
        upload_id = upload_id_of(data, suffix)
        with self.lock:
            upload = self.uploads.get(upload_id) or Upload(data, suffix, {})
            self.uploads[upload_id] = upload
            self.uploads.move_to_end(upload_id)
            while len(self.uploads) > UPLOADS_KEPT:
                self.uploads.popitem(last=False)
        vectors = self.upload_vectors(upload_id, model_id, Path(filename).name)
        return UploadResponse(upload_id=upload_id, model_id=model_id, slices=len(vectors["cls"]))

    def upload_vectors(self, upload_id: str, model_id: str, name: str | None = None) -> dict[str, np.ndarray]:
        """An upload's slices embedded by the model (once per model), read by the ingest's readers;
        a 400 saying why when it cannot be, naming the file as this request named it (`name`)."""
        from embedstore.inference.embed import embed_with
        from embedstore.models.build import rebuild_model  # torch and timm: only once an upload comes

        with self.lock:
            upload = self.uploads.get(upload_id)
            if upload is None:
                raise HTTPException(404, f"no upload {upload_id!r}: send the file to /api/uploads again")
            if model_id not in upload.vectors:
                spec = self.store.spec(model_id)
                if model_id not in self.models:
                    self.models[model_id] = rebuild_model(spec)
                with tempfile.TemporaryDirectory(prefix="embedstore-upload-") as folder:
                    path = Path(folder) / f"upload{upload.suffix}"
                    path.write_bytes(upload.data)
                    try:
                        upload.vectors[model_id] = embed_with(self.models[model_id], spec, path,
                                                              max_pixels=self.settings.max_pixels)
                    except UsageError as error:
                        raise HTTPException(400, str(error).replace(str(path), name or "the upload")) from None
            return upload.vectors[model_id]

    # ------------------------------------------------------------------ items, series, studies
    def item_row(self, public_key: str) -> dict:
        """The `items` row behind a public key; 404 when there is none."""
        key = self.stored_or_404(public_key, "slice with key")
        rows = self.store.rows("items", equals("key", key)).to_pylist()
        if not rows:
            raise HTTPException(404, f"no slice with key {public_key!r} in this store")
        return rows[0]

    def item(self, public_key: str) -> ItemResponse:
        row = self.item_row(public_key)
        return ItemResponse(
            key=public_key, series_uid=self.ids.public(row["series_uid"]), study_uid=self.ids.public(row["study_uid"]),
            **{name: row[name] for name in ITEM_FIELDS}, rows=row["rows"], cols=row["cols"],
            pixel_spacing=row["pixel_spacing"], slice_thickness=row["slice_thickness"],
            thumbnail=self.thumbnail_url(row["key"], self.model_id(None)), **self.shown_path(row["path"]))

    def series(self, public_uid: str) -> SeriesResponse:
        uid = self.stored_or_404(public_uid, "series")
        rows = self.store.rows("series", equals("series_uid", uid)).to_pylist()
        if not rows:
            raise HTTPException(404, f"no series {public_uid!r} in this store")
        return SeriesResponse(**self.series_summary(rows[0]).model_dump(), members=self.members("series_uid", uid))

    def study(self, public_uid: str) -> StudyResponse:
        uid = self.stored_or_404(public_uid, "study")
        rows = self.store.rows("series", equals("study_uid", uid)).to_pylist()
        if not rows:
            raise HTTPException(404, f"no study {public_uid!r} in this store")
        rows.sort(key=lambda row: (row["series_description"] or "", row["series_uid"]))
        by_series: dict[str, list[Member]] = {}
        for member in self.members("study_uid", uid):
            by_series.setdefault(member.series_uid, []).append(member)
        series = []
        for row in rows:
            own = by_series.get(self.ids.public(row["series_uid"]), [])
            series.append(StudySeries(**self.series_summary(row).model_dump(),
                                      thumbnail=own[len(own) // 2].thumbnail if own else None))
        return StudyResponse(study_uid=public_uid, study_date=rows[0]["study_date"],
                             modality="/".join(sorted({row["modality"] for row in rows if row["modality"]})) or None,
                             n_series=len(rows), n_slices=sum(row["n_slices"] for row in rows), series=series)

    def series_summary(self, row: dict) -> SeriesSummary:
        return SeriesSummary(series_uid=self.ids.public(row["series_uid"]), study_uid=self.ids.public(row["study_uid"]),
                             **{name: row[name] for name in SERIES_FIELDS},
                             n_slices=row["n_slices"], slice_spacing=row["slice_spacing"])

    def members(self, column: str, uid: str) -> list[Member]:
        model_id = self.model_id(None)
        rows = self.store.rows("items", equals(column, uid), ["key", "series_uid", "slice_index"])
        return [Member(key=self.ids.public(row["key"]), series_uid=self.ids.public(row["series_uid"]),
                       slice_index=row["slice_index"], thumbnail=self.thumbnail_url(row["key"], model_id))
                for row in sorted(rows.to_pylist(), key=lambda row: (row["series_uid"], row["slice_index"]))]

    # ------------------------------------------------------------------ thumbnails and facets
    def thumbnail(self, public_key: str, model: str | None) -> bytes:
        row = self.item_row(public_key)
        intensity = self.store.spec(self.model_id(model)).intensity
        try:
            return self.thumbnails.get(row, intensity)
        except (OSError, InputError) as error:  # the file moved or changed since the ingest
            raise HTTPException(404, f"slice {public_key!r} cannot be read again from its file "
                                     f"({type(error).__name__})") from None

    def facets(self) -> FacetsResponse:
        rows = self.store.rows("series", None, ["modality", "body_part", "study_date"])

        def values(name: str) -> list[str]:
            return sorted({value for value in rows.column(name).to_pylist() if value}) if rows.num_rows else []

        dates = values("study_date")
        return FacetsResponse(modality=values("modality"), body_part=values("body_part"),
                              study_date=[dates[0], dates[-1]] if dates else None)


async def read_upload(request: Request, max_mb: float) -> bytes:
    """The request body, refused (413) as soon as it is known to be over `max_mb`: from its declared
    length, or while it streams in."""
    limit = int(max_mb * (1 << 20))
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the upload is larger than {max_mb:g} MB")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, f"the upload is larger than {max_mb:g} MB")
    if not body:
        raise HTTPException(400, "the upload is empty: send the file as the request body")
    return bytes(body)


def create_app(settings: ServeSettings) -> FastAPI:
    service = Service(settings)
    app = FastAPI(title="embedstore", version=__version__,
                  description="Similarity search over an embedstore store, and thumbnails of its slices.")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": json_safe(error.errors())}, status_code=422)

    @app.exception_handler(StoreDamagedError)
    def damaged_store(request: Request, error: StoreDamagedError) -> JSONResponse:
        return JSONResponse({"detail": service.message(error)}, status_code=503)

    def authorised(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/api", dependencies=[Depends(authorised)])

    @api.get("/models")
    def models() -> ModelsResponse:
        specs = service.store.specs().values()
        return ModelsResponse(models=[ModelInfo(
            model_id=spec.model_id, name=spec.name, architecture=spec.timm_name, weights=spec.weights_source,
            image_size=spec.image_size, embed_dim=spec.embed_dim, window=spec.window,
            default_feature=service.default_feature(spec.model_id)[0],
            default_feature_note=service.default_feature(spec.model_id)[1]) for spec in specs])

    @api.get("/facets")
    def facets() -> FacetsResponse:
        return service.facets()

    @api.post("/search", response_model_exclude_unset=True)
    def search(request: SearchRequest) -> SearchResponse:
        return service.search(request)

    @api.post("/uploads", openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload(request: Request, filename: str = "upload", model: str | None = None) -> UploadResponse:
        """The file is the request body (DICOM, NIfTI, PNG, JPEG, TIFF); `filename` gives its suffix."""
        body = await read_upload(request, settings.max_upload_mb)
        model_id = service.model_id(model)
        return await run_in_threadpool(service.add_upload, body, filename, model_id)

    @api.get("/items/{key:path}", response_model_exclude_unset=True)
    def item(key: str) -> ItemResponse:
        return service.item(key)

    @api.get("/series/{uid:path}")
    def series(uid: str) -> SeriesResponse:
        return service.series(uid)

    @api.get("/studies/{uid:path}")
    def study(uid: str) -> StudyResponse:
        return service.study(uid)

    app.include_router(api)

    @app.get("/thumbnails/{name:path}", dependencies=[Depends(authorised)],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def thumbnail(name: str, model: str | None = None) -> Response:
        if not name.endswith(".png"):
            raise HTTPException(404, "thumbnails are /thumbnails/<key>.png")
        return Response(service.thumbnail(name.removesuffix(".png"), model), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def check_exposure(host: str, token: str | None) -> None:
    """Any address but loopback lets other machines in: then a token is required."""
    if host not in LOOPBACK_HOSTS and not token:
        raise UsageError(f"--host {host} lets other machines reach the store: give --token (a long random string "
                         f"every request must carry as 'Authorization: Bearer <token>'), or keep --host 127.0.0.1")
    if token is not None and len(token) < 16:
        raise UsageError("--token must be at least 16 characters (e.g. python -c 'import secrets; "
                         "print(secrets.token_urlsafe(24))')")


def service_token(token: str | None, token_file: Path | None) -> str | None:
    """The token every request must carry: given (--token, EMBEDSTORE_TOKEN) or read from a file,
    not both."""
    if token_file is None:
        return token
    if token is not None:
        raise UsageError("give the token once: --token (or EMBEDSTORE_TOKEN) or --token-file")
    return read_token_file(token_file)


def read_token_file(path: Path) -> str:
    """The token in the first line of `path`; UsageError when there is none to read."""
    check_input_file(path, "--token-file")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"--token-file {path} is not text") from None
    if not lines or not lines[0].strip():
        raise UsageError(f"--token-file {path} is empty")
    return lines[0].strip()


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    check_exposure(host, settings.token)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
