"""The suite's tables and plots, from its cached cells only (a rerun writes the same numbers):

- `results.parquet`: one row per cell and metric (dataset, model, model_id, protocol, seed, setting,
  metric, value, ci_low, ci_high);
- `leaderboard.md` / `.csv`: per dataset and protocol, each model's headline metric as mean ± std over
  seeds (no spread when one seed ran: std is left empty, not 0) with the first seed's 95%
  patient-bootstrap interval, the best per column marked;
- `heatmap.png`: models x (dataset, protocol) of the headline means;
- `fewshot-<dataset>.png`: every model's few-shot curve on one plot;
- `paired.csv` and a table in the Markdown: each model against the suite's baseline on the same test
  patients (paired bootstrap of the difference in the headline metric).
Every PNG has an SVG beside it.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from embedstore.bench.cells import Cell, CellCache
from embedstore.bench.suite import Suite
from embedstore.eval.bootstrap import paired_difference
from embedstore.eval.results import EvaluationResult, FewShotResult
from embedstore.protocols import PROTOCOLS


def result_of(record: dict) -> EvaluationResult:
    """A cached cell's result, rebuilt as its protocol's result class."""
    return PROTOCOLS[record["cell"]["protocol"]].result.from_dict(record["result"])


def metric_rows(cell: dict, result: EvaluationResult) -> list[dict]:
    """A cell's metrics as rows of results.parquet: every setting it reports on test."""
    base = {"dataset": cell["dataset"], "model": cell["model"], "model_id": cell["model_id"],
            "protocol": cell["protocol"], "seed": cell["seed"]}
    rows = []
    for setting, metrics, interval in result.settings():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                low, high = interval.get(name, (None, None))
                rows.append({**base, "setting": setting, "metric": name, "value": float(value),
                             "ci_low": low, "ci_high": high})
    return rows


def write_leaderboard(suite: Suite, keyed: list[tuple[str, Cell]], cache: CellCache, out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [(key, cache.result(key)) for key, _ in keyed]
    records = [(key, record) for key, record in records if record is not None]
    rows = [row for _, record in records for row in metric_rows(record["cell"], result_of(record))]
    columns = ["dataset", "model", "model_id", "protocol", "seed", "setting", "metric", "value", "ci_low", "ci_high"]
    pq.write_table(pa.table({name: [row[name] for row in rows] for name in columns}), out / "results.parquet")

    table = leaderboard_table(suite, records)
    write_csv(out / "leaderboard.csv", table)
    paired = paired_comparisons(suite, records, cache)
    write_csv(out / "paired.csv", paired)
    plot_heatmap(suite, table, out / "heatmap.png")
    curves = plot_fewshot(suite, records, out)
    path = out / "leaderboard.md"
    path.write_text(markdown(suite, table, paired, curves))
    return path


def leaderboard_table(suite: Suite, records: list[tuple[str, dict]]) -> list[dict]:
    """One row per (dataset, protocol, model): the headline metric over seeds, best per column marked."""
    metric_of_column, headline = {}, defaultdict(list)
    for _, record in records:
        cell, result = record["cell"], result_of(record)
        metric, setting = result.headline_metric, result.headline_setting()
        metric_of_column[cell["dataset"], cell["protocol"]] = metric
        row = next((row for row in metric_rows(cell, result) if (row["metric"], row["setting"]) == (metric, setting)),
                   None)  # None: the metric is undefined on this cell's test rows
        if row is not None:
            headline[cell["dataset"], cell["protocol"], cell["model"]].append(row)
    table = []
    for dataset in suite.datasets:
        for protocol in suite.protocols:
            if (dataset, protocol) not in metric_of_column:
                continue
            entries = []
            for model in suite.models:
                found = sorted(headline.get((dataset, protocol, model), []), key=lambda row: row["seed"])
                if not found:
                    continue
                means = [row["value"] for row in found]
                entries.append({"dataset": dataset, "protocol": protocol, "metric": metric_of_column[dataset, protocol],
                                "model": model, "mean": float(np.mean(means)),
                                "std": float(np.std(means)) if len(means) > 1 else None, "seeds": len(means),
                                "ci_low": found[0]["ci_low"], "ci_high": found[0]["ci_high"]})
            best = max((entry["mean"] for entry in entries), default=None)
            for entry in entries:
                entry["best"] = entry["mean"] == best
            table += entries
    return table


def paired_comparisons(suite: Suite, records: list[tuple[str, dict]], cache: CellCache) -> list[dict]:
    """Each model against the baseline, per dataset, protocol and seed, on the test rows both scored."""
    if suite.baseline is None:
        return []
    by_cell = {}
    for key, record in records:
        cell = record["cell"]
        by_cell[cell["dataset"], cell["protocol"], cell["seed"], cell["model"]] = (key, result_of(record))
    comparisons = []
    for (dataset, protocol, seed, model), (key, result) in sorted(by_cell.items()):
        baseline = by_cell.get((dataset, protocol, seed, suite.baseline))
        if not PROTOCOLS[protocol].paired or model == suite.baseline or baseline is None:
            continue
        ours, theirs = cache.predictions(key), cache.predictions(baseline[0])
        if ours is None or theirs is None:
            continue
        shared, mine, other = np.intersect1d(ours["keys"], theirs["keys"], return_indices=True)
        metric = result.headline_metric
        difference = paired_difference(ours["targets"][mine], ours["scores"][mine], theirs["scores"][other],
                                       ours["patients"][mine], result.multilabel, metric)
        if difference is None:
            continue
        comparisons.append({"dataset": dataset, "protocol": protocol, "seed": seed, "model": model,
                            "baseline": suite.baseline, "metric": metric, "test_rows": len(shared),
                            "difference": difference[0], "ci_low": difference[1][0], "ci_high": difference[1][1]})
    return comparisons


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def interval_text(low, high) -> str:
    return "" if low is None else f" [{low:.3f}, {high:.3f}]"


def spread_text(entry: dict) -> str:
    """The mean, and ± the std over seeds when more than one ran."""
    return f"{entry['mean']:.3f}" + (f" ± {entry['std']:.3f}" if entry["seeds"] > 1 else "")


def markdown(suite: Suite, table: list[dict], paired: list[dict], curves: list[str]) -> str:
    seeds = ", ".join(map(str, suite.seeds))
    over = f"Mean ± std over seeds {seeds}" if len(suite.seeds) > 1 else f"One seed ({seeds})"
    lines = [f"# {suite.name}", "",
             f"{over}; in brackets the first seed's 95% interval by a bootstrap over test "
             "patients (1,000 resamples). **Bold**: the best of its column.", ""]
    columns = sorted({(entry["dataset"], entry["protocol"]) for entry in table},
                     key=lambda pair: (list(suite.datasets).index(pair[0]), list(suite.protocols).index(pair[1])))
    lines.append("| model | " + " | ".join(f"{d} · {p} ({metric_of(table, d, p)})" for d, p in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for model in suite.models:
        cells = []
        for dataset, protocol in columns:
            entry = next((e for e in table if (e["dataset"], e["protocol"], e["model"]) == (dataset, protocol, model)), None)
            if entry is None:
                cells.append("-")
                continue
            text = spread_text(entry) + interval_text(entry["ci_low"], entry["ci_high"])
            cells.append(f"**{text}**" if entry["best"] else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "![headline metric per model and task](heatmap.png)", ""]
    if paired:
        lines += [f"## Against the baseline ({suite.baseline}), on the same test patients", "",
                  "| dataset | protocol | seed | model | metric | difference [95% interval] |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['dataset']} | {p['protocol']} | {p['seed']} | {p['model']} | {p['metric']} | "
                  f"{p['difference']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] |" for p in paired]
        lines.append("")
    for name in curves:
        lines += [f"![few-shot curves]({name})", ""]
    return "\n".join(lines)


def metric_of(table: list[dict], dataset: str, protocol: str) -> str:
    return next(e["metric"] for e in table if (e["dataset"], e["protocol"]) == (dataset, protocol)).replace("_", " ")


def plot_heatmap(suite: Suite, table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from embedstore.eval.report import save_figure

    columns = list(dict.fromkeys((e["dataset"], e["protocol"]) for e in table))
    models = list(suite.models)
    grid = np.full((len(models), len(columns)), np.nan)
    for entry in table:
        grid[models.index(entry["model"]), columns.index((entry["dataset"], entry["protocol"]))] = entry["mean"]
    figure, axes = plt.subplots(figsize=(max(5.0, 1.3 * len(columns) + 2.5), max(3.0, 0.6 * len(models) + 2)), dpi=120)
    image = axes.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    axes.set_xticks(range(len(columns)), [f"{d}\n{p}\n{metric_of(table, d, p)}" for d, p in columns], fontsize=8)
    axes.set_yticks(range(len(models)), models)
    for row in range(len(models)):
        for column in range(len(columns)):
            if not np.isnan(grid[row, column]):
                axes.text(column, row, f"{grid[row, column]:.3f}", ha="center", va="center", fontsize=8,
                          color="white" if grid[row, column] < 0.6 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, label="headline metric (mean over seeds)")
    axes.set_title(f"{suite.name}: models x tasks", fontsize=9)
    save_figure(figure, path)


def plot_fewshot(suite: Suite, records: list[tuple[str, dict]], out: Path) -> list[str]:
    """One plot per dataset with every model's few-shot curve (its linear classifier when it ran, the
    first seed), with the chance level; the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from embedstore.eval.report import chance_level, save_figure

    by_dataset = defaultdict(dict)
    for _, record in records:
        cell, result = record["cell"], result_of(record)
        if isinstance(result, FewShotResult) and cell["seed"] == suite.seeds[0]:
            by_dataset[cell["dataset"]][cell["model"]] = result
    names = []
    for dataset, results in by_dataset.items():
        figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        for model in (m for m in suite.models if m in results):
            result = results[model]
            classifier = "linear" if "linear" in result.curves else next(iter(result.curves))
            points = result.curves[classifier]
            shots = [p["shots"] for p in points]
            axes.plot(shots, [p["mean"] for p in points], marker="o", label=f"{model} ({classifier})")
            axes.fill_between(shots, [p["ci95"][0] for p in points], [p["ci95"][1] for p in points], alpha=0.15)
        first = next(iter(results.values()))
        axes.axhline(chance_level(first.score, len(first.classes)), color="grey", linestyle="--",
                     linewidth=1, label="chance")
        axes.set_xscale("log", base=2)
        axes.set_xticks(first.shots, [str(n) for n in first.shots])
        axes.minorticks_off()
        axes.set_xlabel("training patients per class")
        axes.set_ylabel(first.score.replace("_", " "))
        axes.set_title(f"{suite.name} · {dataset} · {first.feature}: few-shot, {first.tries} draws per point, "
                       f"95% intervals", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        name = f"fewshot-{dataset}.png"
        save_figure(figure, out / name)
        names.append(name)
    return names
