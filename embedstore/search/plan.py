"""How a search runs, chosen from the share of rows its filter keeps.

An IVF index probes the partitions nearest the query and compares the rows in them. A prefilter
leaves a share f of each partition's rows, so with the probes the index was measured at (recall@10
≥ 0.95, `embedstore index`) a filtered search compares f times as many rows, and its recall falls
with f: on 1,000,000 × 384 clustered rows, 20 probes gave recall@10 0.99 at f = 50%, 0.88 at 1%
and 0.14 at 0.1% (benchmarks/filtered_search.py). So:

- **exact-filtered**: the filter keeps at most EXACT_ROWS rows: they are read and compared one by
  one, exactly (at 1M rows reading 1,000 scattered rows costs about one unfiltered index search;
  10,000 cost six);
- **index+probes N**: otherwise the probes are raised to nprobes / f (at most every partition), so
  the search compares as many kept rows as the measured unfiltered search compares rows;
- **index**: no filter, or one that keeps (nearly) every row: the measured probes;
- **exact**: no index on the column (or the study level): every kept row is compared.

Counting the kept rows is a lookup in the scalar indexes `embedstore index` builds (under a
millisecond at 1M rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from embedstore.store import Store

EXACT_ROWS = 2_000
PATHS = ("exact", "exact-filtered", "index", "index+probes")


@dataclass(frozen=True)
class SearchPlan:
    path: str  # one of PATHS
    rows_kept: int  # rows the filter keeps (every row without one)
    rows_total: int
    filtered: bool
    nprobes: int | None = None  # partitions probed, on the index paths
    index_nprobes: int | None = None  # the probes `embedstore index` measured its recall at

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
        why = {
            "exact": "no ANN index on this column, so every row is compared",
            "exact-filtered": f"few enough (at most {EXACT_ROWS:,}) to compare each one: exact",
            "index": f"the ANN index with the {self.nprobes} probes its recall was measured at",
            "index+probes": f"the ANN index with its probes raised from {self.index_nprobes} to {self.nprobes}, so "
                            "that it compares as many kept rows as an unfiltered search compares rows",
        }[self.path]
        return f"plan {self.name}: {rows}; {why}"

    def to_dict(self) -> dict:
        return {"path": self.name, "rows_kept": self.rows_kept, "rows_total": self.rows_total,
                "nprobes": self.nprobes}


def share(plan: SearchPlan) -> float:
    return plan.rows_kept / plan.rows_total if plan.rows_total else 0.0


def choose_plan(store: Store, table: str, condition: str | None, index) -> SearchPlan:
    """The plan for a search of `table` with `condition` (validated) and the column's index
    parameters (search.index.IndexParameters, or None without an index)."""
    total = store.count(table)
    kept = store.count(table, condition) if condition else total
    filtered = condition is not None
    if index is None:
        return SearchPlan("exact-filtered" if filtered else "exact", kept, total, filtered)
    if filtered and kept <= EXACT_ROWS:
        return SearchPlan("exact-filtered", kept, total, filtered, index_nprobes=index.nprobes)
    nprobes = min(index.num_partitions, math.ceil(index.nprobes * total / max(kept, 1)))
    path = "index" if nprobes <= index.nprobes else "index+probes"
    return SearchPlan(path, kept, total, filtered, max(nprobes, index.nprobes), index.nprobes)
