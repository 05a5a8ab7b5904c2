"""The plots of a segmentation report (`--report DIR`): per-class Dice bars, Dice per volume, and overlays of
image, truth and prediction. PNG files, drawn with matplotlib's Agg backend (imported inside the functions, as
in eval/report.py, so that importing this module costs nothing when no report is asked for)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

OVERLAY_ALPHA = 0.45  # the anatomy stays visible under a filled class
PANEL_INCHES = 4.0
MANY_VOLUMES = 50  # above this many dots per column, smaller and fainter dots keep the strip readable


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed, also on a headless server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path) -> None:
    """Write the figure as a PNG and free it (pyplot keeps every open figure alive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot().close(figure)


def plot_class_dice(per_class: list[dict], path: Path, title: str) -> None:
    """A bar pair per class: the Dice pooled over all test pixels (the study's number) and the mean of the
    per-volume Dice. A value of None (a class never present) is marked "n/a" rather than drawn as 0."""
    plt = pyplot()
    names = [str(row["class"]) for row in per_class]
    figure, axes = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2.5), 4.0))
    width = 0.4
    for offset, key, label in ((-width / 2, "global_dice", "pooled over pixels"),
                               (width / 2, "per_volume_dice", "mean per volume")):
        values = [row.get(key) for row in per_class]
        positions = np.arange(len(names)) + offset
        bars = axes.bar(positions, [0.0 if v is None else v for v in values], width, label=label)
        for bar, value in zip(bars, values):
            axes.annotate("n/a" if value is None else f"{value:.3f}", (bar.get_x() + width / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    crowded = len(names) > 6  # long organ names overlap when level
    axes.set_xticks(range(len(names)), names, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    axes.set_ylim(0, 1.2)  # room above a Dice of 1 for its label and the legend
    axes.set_ylabel("Dice")
    axes.set_title(title, fontsize=9)
    axes.legend(loc="upper right", ncol=2, fontsize=8)
    figure.tight_layout()
    save(figure, path)


def volume_columns(per_volume: list[dict], class_names: list[str]) -> tuple[list[str], list[list[float]]]:
    """Column labels and the Dice values of each column: the volume's mean over classes, then each class,
    None values left out (the label counts the volumes that have a value)."""
    columns = [("mean over classes", [row.get("dice") for row in per_volume])]
    columns += [(name, [row.get("per_class", {}).get(name) for row in per_volume]) for name in class_names]
    labels, values = [], []
    for name, column in columns:
        kept = [float(v) for v in column if v is not None]
        labels.append(f"{name}\n(n={len(kept)})")
        values.append(kept)
    return labels, values


def plot_volume_dice(per_volume: list[dict], class_names: list[str], path: Path, title: str) -> None:
    """Dice per volume: a box per column (the volume's mean over classes, then each class) with every
    volume drawn as a jittered dot on it, so that one outlying volume shows among 500."""
    plt = pyplot()
    labels, values = volume_columns(per_volume, class_names)
    figure, axes = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2.0), 4.5))
    filled = [i for i, column in enumerate(values) if column]
    if filled:
        axes.boxplot([values[i] for i in filled], positions=filled, widths=0.5, showfliers=False)
    many = len(per_volume) > MANY_VOLUMES
    rng = np.random.default_rng(0)  # a fixed jitter: the same results draw the same plot
    for position, column in enumerate(values):
        jitter = rng.uniform(-0.18, 0.18, len(column))
        axes.scatter(position + jitter, column, s=6 if many else 18, alpha=0.35 if many else 0.8,
                     color="tab:blue", zorder=3, linewidths=0)
    axes.set_xticks(range(len(labels)), labels, fontsize=8)
    axes.set_xlim(-0.6, len(labels) - 0.4)
    axes.set_ylim(-0.05, 1.05)
    axes.set_ylabel("Dice")
    axes.set_title(f"{title} ({len(per_volume)} volume{'' if len(per_volume) == 1 else 's'})", fontsize=9)
    figure.tight_layout()
    save(figure, path)


def class_colours(classes: list[int]) -> dict[int, tuple[float, float, float, float]]:
    """A distinct colour per foreground class, in class order (tab10, tab20 beyond 10, a hue wheel beyond 20)."""
    plt = pyplot()
    n = len(classes)
    if n <= 10:
        palette = [plt.get_cmap("tab10")(i) for i in range(n)]
    elif n <= 20:
        palette = [plt.get_cmap("tab20")(i) for i in range(n)]
    else:
        palette = [plt.get_cmap("hsv")(i / n) for i in range(n)]
    return dict(zip(classes, palette))


def class_layer(labels: np.ndarray, colours: dict[int, tuple]) -> np.ndarray:
    """An (H, W, 4) RGBA image of a class map: each class in its colour, background (0) transparent."""
    layer = np.zeros((*labels.shape, 4))
    for value, colour in colours.items():
        layer[labels == value] = (*colour[:3], OVERLAY_ALPHA)
    return layer


def write_overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, class_names: dict[int, str],
                  path: Path, title: str) -> None:
    """Three panels side by side: the grey image, the image with the true classes, the image with the
    predicted ones; a legend names each class's colour. A class in the maps but not in `class_names` is drawn
    and named by its value, so nothing predicted is hidden."""
    if not image.shape == truth.shape == prediction.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape}, truth {truth.shape} and prediction {prediction.shape} "
                         "must be (H, W) maps of one size")
    plt = pyplot()
    from matplotlib.patches import Patch

    present = set(np.unique(truth).tolist()) | set(np.unique(prediction).tolist())
    classes = sorted((set(class_names) | present) - {0})
    colours = class_colours(classes)
    height, width = image.shape
    panel_width = PANEL_INCHES * width / height
    figure, panels = plt.subplots(1, 3, figsize=(3 * panel_width, PANEL_INCHES + 0.9))
    for axes, labels, name in zip(panels, (None, truth, prediction), ("image", "truth", "prediction")):
        axes.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if labels is not None:
            axes.imshow(class_layer(labels, colours), interpolation="nearest")
        axes.set_title(name, fontsize=10)
        axes.set_axis_off()
    handles = [Patch(color=colours[value], label=class_names.get(value, f"class {value}")) for value in classes]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    save(figure, path)
