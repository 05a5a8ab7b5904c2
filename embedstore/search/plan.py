"""How a search runs, chosen from the share of rows its filter keeps.

An IVF index probes the partitions nearest the query and compares the rows in them. A prefilter
leaves a share f of each partition's rows, so with the probes the index was measured at (recall@10
≥ 0.95, `embedstore index`) a filtered search compares f times as many rows, and its recall falls
with f: on 1,000,000 × 384 clustered rows, 20 probes gave recall@10 0.99 at f = 50%, 0.88 at 1%
and 0.14 at 0.1% (benchmarks/filtered_search.py). So:

- **exact-filtered**: the filter keeps at most EXACT_ROWS rows: they are read and compared one by
  one, exactly. Read from the table, 1,000 scattered rows of 1M cost about one unfiltered index
  search and 10,000 cost six; read through a memory map from the flat copy `embedstore index`
  keeps beside its index (store/vector_cache.py), 10,000 cost less than two, so up to
  EXACT_ROWS_COPIED are compared one by one when the copy is there;
- **index+probes N**: otherwise the probes are raised to nprobes / f (at most every partition), so
  the search compares as many kept rows as the measured unfiltered search compares rows;
- **index**: no filter, or one that keeps (nearly) every row: the measured probes;
- **exact**: no index on the column (or the study level): every kept row is compared;
- **exact-regions**: a region search (search/regions.py): every kept slice's patch tokens are scored;
- **index-regions**: a region search through the region index (search/region_index.py): windows
  scored on its sketches, the best candidates (and slices added since the index) scored exactly.

Counting the kept rows is a lookup in the scalar indexes `embedstore index` builds (under a
millisecond at 1M rows). Measured with this rule (benchmarks/filtered_search.py, 1,000,000 × 384
rows, IVF_FLAT 1,000 partitions, 20 probes, the index's flat copy, 200 new query points, 2 cores;
p50 over the unfiltered p50 of the same run):

    rows kept   plan                 p50 / unfiltered   recall@10
    100%        index                1.00               0.981
    50%         index+probes 41      1.06               0.989
    10%         index+probes 201     1.23               1.000
    1%          exact-filtered       1.70               1.000
    0.1%        exact-filtered       1.22               1.000
    0.01%       exact-filtered       1.08               1.000

Without the copy (a store indexed before it) 1% went through every partition at 3.6x and 0.1%
exactly at 2.4x: Lance reads a scattered row in about 9 µs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from embedstore.store import Store

EXACT_ROWS = 2_000  # kept rows compared one by one when they are read from the table
EXACT_ROWS_COPIED = 20_000  # ... when the indexed column's flat copy holds them
PATHS = ("exact", "exact-filtered", "index", "index+probes", "exact-regions", "index-regions")


@dataclass(frozen=True)
class SearchPlan:
    path: str  # one of PATHS
    rows_kept: int  # rows the filter keeps (every row without one)
    rows_total: int
    filtered: bool
    nprobes: int | None = None  # partitions probed, on the index paths
    index_nprobes: int | None = None  # the probes `embedstore index` measured its recall at
    copied: bool = False  # the indexed column has a flat copy to read kept rows from
    candidates: int | None = None  # index-regions: the indexed slices scored exactly
    unindexed: int = 0  # index-regions: kept slices the region index does not hold, scored exactly

    @property
    def name(self) -> str:
        return f"index+probes {self.nprobes}" if self.path == "index+probes" else self.path

    @property
    def uses_index(self) -> bool:
        return self.path.startswith("index")

    def explain(self) -> str:
        """The plan for a person: what ran, over how many rows, and why."""
        rows = (f"the filter keeps {self.rows_kept:,} of {self.rows_total:,} rows ({share(self):.2%})"
                if self.filtered else f"{self.rows_total:,} rows")
        return f"plan {self.name}: {rows}; {self.why()}"

    def why(self) -> str:
        # One branch per path: only the chosen path's fields are set (candidates is None off the region index).
        if self.path == "exact":
            return "no ANN index on this column, so every row is compared"
        if self.path == "exact-filtered":
            return f"few enough (at most {self.exact_rows:,}) to compare each one: exact"
        if self.path == "index":
            return f"the ANN index with the {self.nprobes} probes its recall was measured at"
        if self.path == "index+probes":
            return (f"the ANN index with its probes raised from {self.index_nprobes} to {self.nprobes}, so "
                    "that it compares as many kept rows as an unfiltered search compares rows")
        if self.path == "exact-regions":
            return "region search scores the patch tokens of every kept slice"
        added = f", and the {self.unindexed:,} slices added since it was built" if self.unindexed else ""
        return (f"the region index scored every window of the kept slices on its sketches and "
                f"{self.candidates:,} candidates exactly{added}")

    @property
    def exact_rows(self) -> int:
        return EXACT_ROWS_COPIED if self.copied else EXACT_ROWS

    def to_dict(self) -> dict:
        return {"path": self.name, "rows_kept": self.rows_kept, "rows_total": self.rows_total,
                "nprobes": self.nprobes}


def share(plan: SearchPlan) -> float:
    return plan.rows_kept / plan.rows_total if plan.rows_total else 0.0


def choose_plan(store: Store, table: str, condition: str | None, index, copied: bool = False) -> SearchPlan:
    """The plan for a search of `table` with `condition` (validated), the column's index parameters
    (search.index.IndexParameters, or None without an index) and whether its flat copy exists."""
    total = store.count(table)
    kept = store.count(table, condition) if condition else total
    filtered = condition is not None
    if index is None:
        return SearchPlan("exact-filtered" if filtered else "exact", kept, total, filtered)
    if filtered and kept <= (EXACT_ROWS_COPIED if copied else EXACT_ROWS):
        return SearchPlan("exact-filtered", kept, total, filtered, index_nprobes=index.nprobes, copied=copied)
    nprobes = min(index.num_partitions, math.ceil(index.nprobes * total / max(kept, 1)))
    path = "index" if nprobes <= index.nprobes else "index+probes"
    return SearchPlan(path, kept, total, filtered, max(nprobes, index.nprobes), index.nprobes, copied)
