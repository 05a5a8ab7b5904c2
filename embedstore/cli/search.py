"""`embedstore search`, `index` and `export`: the stored vectors queried, indexed, written out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from embedstore.cli.options import FeatureOption, LevelOption, ModelIdOption, StoreArgument, WhereOption
from embedstore.cli.render import out, print_hits, print_index_report, warn


def search(
    store: StoreArgument,
    image: Optional[Path] = typer.Option(None, "--image", help="Query by an image file (embedded with the store's model)."),
    key: Optional[str] = typer.Option(None, "--key", help="Query by a stored slice's key."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="Query by a stored series."),
    study_uid: Optional[str] = typer.Option(None, "--study-uid", help="Query by a stored study."),
    k: int = typer.Option(10, "--k", "-k", help="Results to return."),
    level: str = typer.Option("slice", help="slice, series or study (best match per query slice, averaged)."),
    where: WhereOption = None,
    feature: FeatureOption = "cls",
    model_id: ModelIdOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table (with the plan that ran)."),
    explain: bool = typer.Option(False, "--explain", help="Say how the search ran: exactly or through the index, "
                                 "with how many probes, over how many of the rows the filter keeps."),
    box: Optional[str] = typer.Option(None, "--box", help="Region search: X0,Y0,X1,Y1 (columns then rows, in the "
                                      "--key slice's or --image's own pixels); ranks regions by patch tokens."),
    block: Optional[int] = typer.Option(None, "--block", help="With --box: the stored block whose patch tokens are "
                                        "compared (negative counts from the end). Default: the last stored."),
    per_slice: int = typer.Option(1, "--per-slice", help="With --box: most regions from one slice."),
    score: str = typer.Option("window", "--score", help="With --box: window (the box's tokens against each window "
                              "of that shape, in place) or late (each token's best match anywhere, averaged)."),
    exact: bool = typer.Option(False, "--exact", help="With --box: score every slice, even where a region index "
                               "(index --regions) would pick the candidates."),
) -> None:
    """The stored slices, series or studies most similar to a query.

    With --box, the regions most similar to a box drawn on a slice, from the stored patch tokens."""
    from embedstore.search import similar
    from embedstore.search.degenerate import stored_feature_warning
    from embedstore.store import Store

    opened = Store.open(store)
    sources = {"--image": ("image", image), "--key": ("key", key), "--series-uid": ("series_uid", series_uid),
               "--study-uid": ("study_uid", study_uid)}
    if box is not None:
        search_regions(opened, sources, box=box, k=k, level=level, where=where, model_id=model_id, block=block,
                       per_slice=per_slice, score=score, exact=exact, as_json=as_json, explain=explain)
        return
    query = similar.query_for(opened, sources, feature, model_id)
    hits = similar.search(opened, query, k, level, feature, where)
    warn(stored_feature_warning(opened, query.model_id, feature, "series" if level == "series" else "slice"))
    if as_json:
        print(json.dumps({"query": query.description, "model_id": query.model_id, "level": level,
                          "feature": feature, "where": where, "plan": hits.plan.to_dict(),
                          "hits": similar.hits_as_dicts(hits)}, indent=2))
        return
    if explain:
        out.print(hits.plan.explain())
    print_hits(hits, level, query.description, where)


def search_regions(opened, sources: dict, *, box: str, k: int, level: str, where: str | None, model_id: str | None,
                   block: int | None, per_slice: int, score: str, exact: bool, as_json: bool, explain: bool) -> None:
    from embedstore.search import regions

    query = regions.region_query_for(opened, sources, box, model_id, block)
    hits = regions.search_regions(opened, query, k, where, level, per_slice, score, on_slow=warn, exact=exact)
    if as_json:
        print(json.dumps({"query": query.description, "model_id": query.model_id, "block": query.block,
                          "box": query.box.as_tuple(), "level": level, "score": score, "where": where,
                          "plan": hits.plan.to_dict(), "hits": regions.region_hits_as_dicts(hits)}, indent=2))
        return
    if explain:
        out.print(hits.plan.explain())
    print_region_hits(hits, query.description, where)


def print_region_hits(hits: list, description: str, where: str | None) -> None:
    """Region search results: the slice each region is on (whole, for --key) and the matched box."""
    if not hits:
        out.print("no stored slices with patch tokens to rank" + (f": none matches {where}" if where else ""))
        return
    table = Table(title=f"regions most similar to {description}")
    table.add_column("rank")
    table.add_column("score")
    table.add_column("key (for --key)", no_wrap=True, min_width=max(len(hit.key) for hit in hits))
    table.add_column("box X0,Y0,X1,Y1", no_wrap=True)
    for column in ["modality", "series description", "slice", "path"]:
        table.add_column(column, overflow="fold")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.key, ",".join(map(str, hit.box)), hit.modality or "",
                      hit.series_description or "", str(hit.slice_index), hit.path or "")
    out.print(table)


def index(
    store: StoreArgument,
    index_type: str = typer.Option("ivf_flat", "--type", help="ivf_flat, or for a smaller index ivf_sq, ivf_pq or "
                                                             "ivf_hnsw_sq."),
    feature: str = typer.Option("cls", "--feature", "--column", help="The feature to index: cls or patch_mean "
                                "(--column is its former name)."),
    level: LevelOption = "slice",
    model_id: ModelIdOption = None,
    regions: bool = typer.Option(False, "--regions", help="Build the region index instead: sketches and a flat copy "
                                 "of the patch tokens, for search --box at archive scale."),
    block: Optional[int] = typer.Option(None, "--block", help="With --regions: the stored block to index (negative "
                                        "counts from the end). Default: the last stored."),
) -> None:
    """Build an ANN index with parameters chosen from the table size, and measure its recall@10.

    With --regions, the region index that region search (search --box) picks candidates from."""
    from embedstore.search.index import NoIndex, build_index
    from embedstore.store import Store

    if regions:
        from embedstore.search.region_index import build_region_index

        print_region_index_report(build_region_index(Store.open(store), model_id, block))
        return
    report = build_index(Store.open(store), model_id, feature, level, index_type)
    if isinstance(report, NoIndex):
        out.print(report.reason)
    else:
        print_index_report(report)


def print_region_index_report(report) -> None:
    out.print(f"region index of {report.model_id} block {report.block}: {report.n_slices:,} slices in "
              f"{report.n_shards:,} patch shards ({report.n_shards_added:,} added), {report.sketch_dim}-d sketches; "
              f"{report.bytes_per_slice:,} bytes a slice, {report.size_bytes / 1e9:.2f} GB in {report.folder}; "
              f"built in {report.seconds:.1f} s")


def export(
    store: StoreArgument,
    destination: Path = typer.Argument(..., metavar="OUT", help="parquet: the file to write; npy: a new or empty "
                                       "directory."),
    export_format: str = typer.Option(..., "--format", help="parquet (metadata columns and a `vector` column) or npy "
                                      "(OUT/vectors.npy, (n, D) float32, and OUT/rows.parquet, row i for vector i)."),
    model_id: ModelIdOption = None,
    feature: FeatureOption = "cls",
    level: LevelOption = "slice",
    where: WhereOption = None,
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels CSV (as for eval): adds label and split "
                                          "columns; rows it does not name keep null."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (never one inside the store "
                                   "or an input file)."),
) -> None:
    """Write one model's vectors with their metadata as Parquet or NumPy, for other tools."""
    from embedstore.export import export_vectors
    from embedstore.store import Store

    summary = export_vectors(Store.open(store), destination, export_format, model_id=model_id, feature=feature,
                             level=level, where=where, labels=labels, overwrite=overwrite)
    print(f"{summary.n_rows:,} {summary.level} vectors ({summary.feature}, {summary.dim}-d) of "
          f"{summary.model_id} written to {summary.out}"
          + (f"; {summary.n_labelled:,} labelled" if summary.n_labelled is not None else ""))
