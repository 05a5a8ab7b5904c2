"""`--report DIR`: an evaluation's JSON, a Markdown summary and its plots (the confusion matrix of
the reported classifier, or the few-shot curve), in one directory."""

from __future__ import annotations

import json
from pathlib import Path

from embedstore.eval.results import EvaluationResult, FewShotResult

HEADLINE_METRICS = ("top1_accuracy", "balanced_accuracy", "macro_auroc", "macro_f1")


def write_report(result: EvaluationResult, directory: Path) -> Path:
    """Write DIR/<task>.json, DIR/report.md and the plots; returns the Markdown file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{result.task}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    counts = ", ".join(f"{split} {n:,}" for split, n in result.counts.items())
    lines = [f"# {result.task}: {result.model_id}", "",
             f"Feature `{result.feature}`, {result.level} level, {len(result.classes)} classes"
             f"{' (multi-label)' if result.multilabel else ''}; {counts}.", ""]
    lines += [line for warning in result.warnings for line in (f"**Warning**: {warning}", "")]
    if isinstance(result, FewShotResult):
        plot_curves(result, directory / "fewshot.png")
        lines += [f"Score: {result.score}, mean [95% interval] over {result.tries} draws per point.", "",
                  "| patients per class | " + " | ".join(result.curves) + " |",
                  "|---|" + "---|" * len(result.curves)]
        for row, shots in enumerate(result.shots):
            cells = [f"{c[row]['mean']:.3f} [{c[row]['ci95'][0]:.3f}, {c[row]['ci95'][1]:.3f}]"
                     for c in result.curves.values()]
            lines.append(f"| {shots} | " + " | ".join(cells) + " |")
        lines += ["", "![few-shot curve](fewshot.png)"]
    else:
        described, metrics = result.reported()
        interval = metrics.get("ci95", {})
        lines += [f"Reported on test: {described}; 95% intervals by a bootstrap over test patients (1,000 "
                  "resamples).", "", "| metric | value | 95% interval |", "|---|---|---|"]
        lines += [f"| {name} | {metrics[name]:.4f} | "
                  + (f"[{interval[name][0]:.4f}, {interval[name][1]:.4f}]" if name in interval else "-") + " |"
                  for name in HEADLINE_METRICS if metrics.get(name) is not None]
        if "confusion_matrix" in metrics:
            plot_confusion(metrics["confusion_matrix"], result.classes, directory / "confusion.png",
                           title_lines(result, f"{result.task}: confusion on test\n{described}"))
            lines += ["", "![confusion matrix on test](confusion.png)"]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    """Counts and row-normalised rates (the recall of each true class) per cell, coloured by the rate,
    the text dark or light by the cell's shade; a PNG and an SVG beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(6.0, 0.6 * len(classes) + 2.5)
    figure, axes = plt.subplots(figsize=(size, size), dpi=120)
    colours = plt.get_cmap("Blues")
    image = axes.imshow(rates, cmap=colours, vmin=0, vmax=1)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row in range(len(classes)):
        for column in range(len(classes)):
            red, green, blue, _ = colours(rates[row, column])
            text = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.55 else "black"
            axes.text(column, row, f"{int(counts[row, column])}\n{rates[row, column]:.0%}", ha="center",
                      va="center", fontsize=8, color=text)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    axes.set_title(title, fontsize=8)
    save_figure(figure, path)


def title_lines(result: EvaluationResult, what: str) -> str:
    """A plot's title: what it shows, the dataset (the labels file), the model and the feature."""
    return f"{what}\n{dataset_name(result)}\n{result.model_id}\nfeature {result.feature}, {result.level} level"


def dataset_name(result: EvaluationResult) -> str:
    """The labels file, as its folder and name say it (data/nih/labels.csv → nih/labels.csv)."""
    if not result.labels:
        return "labels"
    path = Path(result.labels["path"])
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def chance_level(metric: str, n_classes: int) -> float:
    """What guessing scores: 0.5 for AUROC, one over the classes for (balanced) accuracy."""
    return 0.5 if "auroc" in metric else 1.0 / n_classes


def save_figure(figure, path: Path) -> None:
    """The figure as the PNG asked for and an SVG beside it (for a paper: its text stays text)."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path)
    with plt.rc_context({"svg.fonttype": "none"}):  # no date inside: a rerun writes the same file
        figure.savefig(Path(path).with_suffix(".svg"), metadata={"Date": None})
    plt.close(figure)


def plot_curves(result, path) -> None:
    """The few-shot curve (mean and 95% band per classifier) with the chance level, as a PNG and an SVG
    beside it, titled with the model, dataset and feature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, points in result.curves.items():
        shots = [p["shots"] for p in points]
        axes.plot(shots, [p["mean"] for p in points], marker="o", label=name)
        axes.fill_between(shots, [p["ci95"][0] for p in points], [p["ci95"][1] for p in points], alpha=0.2)
    axes.axhline(chance_level(result.score, len(result.classes)), color="grey", linestyle="--", linewidth=1,
                 label="chance")
    axes.set_xscale("log", base=2)
    axes.set_xticks(result.shots, [str(n) for n in result.shots])
    axes.minorticks_off()
    axes.set_xlabel("training patients per class")
    axes.set_ylabel(result.score.replace("_", " "))
    axes.set_title(title_lines(result, f"few-shot, {result.tries} draws per point, 95% intervals"), fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, path)
