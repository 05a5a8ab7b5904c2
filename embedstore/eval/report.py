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
        from embedstore.eval.fewshot import plot_curves

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
            plot_confusion(metrics["confusion_matrix"], result.classes, directory / "confusion.png")
            lines += ["", "![confusion matrix on test](confusion.png)"]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4, 0.5 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size), dpi=120)
    image = axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            axes.text(column, row, str(value), ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
