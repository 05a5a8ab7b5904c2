"""The shapes the service answers with, one pydantic model per route (the OpenAPI page at /docs shows
them). Identifiers are public ids (public.PublicIds); `path` is present only with --show-paths."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelInfo(BaseModel):
    model_id: str
    name: str
    architecture: str = Field(description="timm's name of the architecture")
    weights: str = Field(description="hub, random, or a checkpoint's file name")
    image_size: int
    embed_dim: int
    window: str
    default_feature: str = Field(description="the feature a search uses when it names none")
    default_feature_note: str | None = Field(description="why the default is not cls, when it is not")


class ModelsResponse(BaseModel):
    models: list[ModelInfo] = Field(description="the store's models; the first is the default")


class FacetsResponse(BaseModel):
    modality: list[str]
    body_part: list[str]
    study_date: list[str] | None = Field(description="[earliest, latest], or null when no study has a date")


class SliceMetadata(BaseModel):
    """The metadata fields a result or an item shows (public.ITEM_FIELDS)."""

    modality: str | None
    body_part: str | None
    study_date: str | None
    series_description: str | None
    slice_index: int | None


class SearchResult(SliceMetadata):
    rank: int
    score: float = Field(description="cosine similarity to the query")
    level: str
    key: str = Field(description="a slice key, a series UID or a study UID, by level")
    series_uid: str | None
    study_uid: str
    n_slices: int | None
    n_series: int | None
    thumbnail: str | None = Field(description="URL of the slice's (or the middle slice's) thumbnail")
    strip: list[str] = Field(description="series and study results: thumbnails of up to 6 slices in order")
    box: list[int] | None = Field(None, description="region search: the matched region X0, Y0, X1, Y1 in the "
                                  "slice's own pixels (columns then rows, the ends exclusive)")
    rows: int | None = Field(None, description="region search: the slice's rows, which the box is counted in")
    cols: int | None = Field(None, description="region search: the slice's columns")
    path: str | None = None


class SearchPlanInfo(BaseModel):
    """How the search ran, chosen from the share of rows the filter keeps."""

    path: str = Field(description="exact, exact-filtered, index, or index+probes N")
    rows_kept: int = Field(description="rows the filter keeps (every row without one)")
    rows_total: int
    nprobes: int | None = Field(description="index partitions probed, on the index paths")


class SearchResponse(BaseModel):
    model_id: str
    level: str
    feature: str
    where: str | None = Field(description="the filter as applied")
    plan: SearchPlanInfo
    box: list[int] | None = Field(None, description="region search: the query box as applied")
    results: list[SearchResult]


class UploadResponse(BaseModel):
    upload_id: str = Field(description="for POST /api/search")
    model_id: str
    slices: int = Field(description="slices read from the file and embedded")


class ItemResponse(SliceMetadata):
    key: str
    series_uid: str
    study_uid: str
    rows: int | None
    cols: int | None
    pixel_spacing: list[float] | None
    slice_thickness: float | None
    thumbnail: str
    path: str | None = None


class Member(BaseModel):
    key: str
    series_uid: str
    slice_index: int | None
    thumbnail: str


class SeriesSummary(BaseModel):
    series_uid: str
    study_uid: str
    modality: str | None
    body_part: str | None
    study_date: str | None
    series_description: str | None
    n_slices: int
    slice_spacing: float | None


class SeriesResponse(SeriesSummary):
    members: list[Member] = Field(description="the series' slices in order")


class StudySeries(SeriesSummary):
    thumbnail: str | None = Field(description="the series' middle slice")


class StudyResponse(BaseModel):
    study_uid: str
    study_date: str | None
    modality: str | None = Field(description="the study's modalities joined by '/'")
    n_series: int
    n_slices: int
    series: list[StudySeries]
