"""`eval segment --report DIR`: the JSON, a Markdown summary, per-class Dice, Dice per volume and
overlays (image, truth, prediction) of a few test slices."""

from __future__ import annotations

import json
from pathlib import Path

from embedstore.eval.results import SegmentResult
from embedstore.eval.segment.plots import plot_class_dice, plot_volume_dice, write_overlay


def write_segment_report(result: SegmentResult, directory: Path) -> Path:
    """Write DIR/segment.json, DIR/report.md and the plots (first seed's test); returns the Markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "segment.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    test = result.runs[0]["test"]
    title = f"{result.model_id}\n{result.decoder} decoder, test set"
    plot_class_dice(test["per_class"], directory / "class_dice.png", title)
    plot_volume_dice(test["per_volume"], result.classes, directory / "volume_dice.png", title)
    overlay_files = []
    for number, overlay in enumerate(result.overlays):
        path = directory / f"overlay_{number}.png"
        write_overlay(overlay.image, overlay.truth, overlay.prediction, result.class_values, path, overlay.name)
        overlay_files.append(path.name)
    counts = ", ".join(f"{split} {n:,}" for split, n in result.counts.items())
    seeds = ", ".join(map(str, result.seeds))
    lines = [f"# segment: {result.model_id}", "",
             f"{result.decoder} decoder on the patch tokens of blocks {', '.join(map(str, result.blocks))}; "
             f"{len(result.classes)} classes; slices {counts}; volumes "
             + ", ".join(f"{split} {n}" for split, n in result.split["volumes"].items())
             + f"; {result.loss} loss, {result.epochs} epochs, batch {result.batch_size}; seeds {seeds}; "
             f"scored at {result.score_at} resolution.", ""]
    lines += [f"- {note}" for note in result.notes()] + [""]
    lines += [f"**Warning**: {warning}" for warning in result.warnings]
    lines += ["| metric | mean | std |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(s['mean'])} | {fmt(s['std'])} |" for name, s in result.metrics.items()]
    lines += ["", f"Empty classes: {result.empty_class_rule}", "",
              "| class | global Dice | per-volume Dice | IoU | truth pixels |", "|---|---|---|---|---|"]
    lines += [f"| {row['class']} | {fmt(row['global_dice'])} | {fmt(row['per_volume_dice'])} | {fmt(row['iou'])} "
              f"| {row['truth_pixels']:,} |" for row in test["per_class"]]
    lines += ["", "![Dice per class](class_dice.png)", "", "![Dice per volume](volume_dice.png)", ""]
    lines += [f"![{name}]({name})" for name in overlay_files]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
