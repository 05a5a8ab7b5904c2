"""Benchmark-suite speed, and the linear probe's fit against scikit-learn's.

1. Suite: 3 models x 2 datasets x (knn, linear, fewshot with 10 tries) over --rows stored 768-d vectors per
   model, run by `embedstore bench` (one seed, --jobs 1), wall time per protocol and in all. The vectors
   are synthetic (1,000 clusters, each model a different noise level) and written straight into a store
   under three ViT-B/14 specs (random weights, seeds 0-2): no backbone runs. Datasets: 10 classes
   (cluster mod 10) and 2 classes (cluster < 500), 4 images per patient, split by patient.
2. Linear probe: embedstore's full-batch L-BFGS (eval/linear.py fit_logistic, each C warm-started from the
   last, as `eval linear` fits its grid) against scikit-learn's LogisticRegression(lbfgs, warm_start) on the
   same train features (cls+patch_mean, 1,536-d) and the same C grid, side by side; the time of each and
   the objective C * sum(loss) + 0.5 * |W|^2 each reaches per C (lower is better).

    python benchmarks/bench_suite.py [--rows 100000] [--c-grid 1e-4,1e-3,1e-2,1e-1,1,10,100]
                                     [--workdir /tmp/embedstore-bench-suite] [--skip-suite]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # embedstore from this checkout
from synthetic import DIM, write_synthetic_store  # noqa: E402  (this folder is on the path: the script's own)

NOISE = (1.5, 2.0, 2.5)  # one model per noise level


def build_store(root: Path, n_rows: int) -> list[str]:
    """The store under root/store with three models' vectors, and the two labels files; the model ids."""
    model_ids, clusters = write_synthetic_store(root / "store", n_rows, NOISE)
    for name, label in (("ten", lambda c: f"c{c % 10}"), ("two", lambda c: "high" if c >= 500 else "low")):
        lines = ["key,label,patient_id"] + [f"synthetic:{i},{label(c)},p{i // 4}" for i, c in enumerate(clusters)]
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return model_ids


SUITE = """name = "speed"
seeds = [0]
[datasets.ten]
store = "store"
labels = "ten.csv"
split_by = "patient"
[datasets.two]
store = "store"
labels = "two.csv"
split_by = "patient"
[models]
{models}
[protocols.knn]
[protocols.linear]
c_grid = {grid}
[protocols.fewshot]
tries = 10
"""


def run_suite(root: Path, model_ids: list[str], grid: list[float]) -> dict:
    models = "\n".join(f'model{n} = "{model_id}"' for n, model_id in enumerate(model_ids))
    (root / "suite.toml").write_text(SUITE.format(models=models, grid=json.dumps(grid)))
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "embedstore"), "bench", str(root / "suite.toml"), "--out",
                    str(root / "out")], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    seconds: dict[str, float] = {}
    for path in (root / "out" / "cells").glob("*.json"):
        cell = json.loads(path.read_text())["cell"]
        seconds[cell["protocol"]] = seconds.get(cell["protocol"], 0.0) + cell["seconds"]
    return {"wall_s": round(wall, 1), "cell_seconds_by_protocol": {k: round(v, 1) for k, v in seconds.items()}}


def objective(weights: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray, c: float) -> float:
    logits = x @ weights + bias
    logits -= logits.max(axis=1, keepdims=True)
    loss = -(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(axis=1))).sum()
    return float(c * loss + 0.5 * (weights ** 2).sum())


def linear_against_sklearn(root: Path, model_id: str, grid: list[float]) -> dict:
    from sklearn.linear_model import LogisticRegression

    from embedstore.eval.evaluate import labelled_vectors
    from embedstore.eval.labels import LabelsSpec
    from embedstore.eval.linear import fit_logistic
    from embedstore.store import Store

    _, data, _ = labelled_vectors(Store.open(root / "store"), LabelsSpec(root / "ten.csv", split_by="patient"),
                                  "cls+patch_mean", "slice", model_id)
    train = data.subset(data.splits == "train")
    # both fitted on the stored float32 vectors, as a user would; objectives computed in float64
    x, y = train.matrix, train.targets
    x64 = x.astype(np.float64)
    ours, theirs, rows = 0.0, 0.0, []
    probe, model = None, LogisticRegression(max_iter=500, warm_start=True)
    for c in sorted(grid):
        started = time.perf_counter()
        probe = fit_logistic(x, y, len(data.classes), c, False, probe)
        ours += time.perf_counter() - started
        started = time.perf_counter()
        model.set_params(C=c).fit(x, y)
        theirs += time.perf_counter() - started
        rows.append({"C": c, "embedstore_objective": objective(probe.weights, probe.bias, x64, y, c),
                     "sklearn_objective": objective(model.coef_.T, model.intercept_, x64, y, c)})
    return {"train_rows": len(x), "dim": x.shape[1], "embedstore_s": round(ours, 1), "sklearn_s": round(theirs, 1),
            "ratio_embedstore_over_sklearn": round(ours / theirs, 3), "per_c": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--c-grid", default="1e-4,1e-3,1e-2,1e-1,1,10,100")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/embedstore-bench-suite"))
    parser.add_argument("--skip-suite", action="store_true", help="only the linear probe against scikit-learn")
    args = parser.parse_args()
    grid = [float(c) for c in args.c_grid.split(",")]
    root = args.workdir / f"rows-{args.rows}"
    if not (root / "ready").exists():
        root.mkdir(parents=True, exist_ok=True)
        model_ids = build_store(root, args.rows)
        (root / "models.json").write_text(json.dumps(model_ids))
        (root / "ready").touch()
    model_ids = json.loads((root / "models.json").read_text())
    suite = None if args.skip_suite else run_suite(root, model_ids, grid)
    if suite:
        print(f"suite: 3 models x 2 datasets x (knn, linear, fewshot 10 tries), {args.rows:,} rows x {DIM}-d per model: "
              f"{suite['wall_s']} s; cell seconds by protocol {suite['cell_seconds_by_protocol']}")
    linear = linear_against_sklearn(root, model_ids[0], grid)
    worse = [row["C"] for row in linear["per_c"] if row["embedstore_objective"] > row["sklearn_objective"] * (1 + 1e-6)]
    print(f"linear probe, {linear['train_rows']:,} train rows x {linear['dim']}-d, {len(grid)} C values: embedstore "
          f"{linear['embedstore_s']} s, scikit-learn {linear['sklearn_s']} s (ratio {linear['ratio_embedstore_over_sklearn']}); "
          f"objective worse than scikit-learn's at C = {worse or 'none'}")
    print(json.dumps({"rows": args.rows, "suite": suite, "linear": linear}))


if __name__ == "__main__":
    main()
