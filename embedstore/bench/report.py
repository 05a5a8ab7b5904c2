"""`embedstore report STORE [--suite OUT] --out DIR`: one document with what a store holds (models,
slices, series, studies, failures by reason), how fast it was ingested (each run's slices/s and seconds
per stage, from the runs table), how well its ANN indexes answer (recall@10 and latency, from the
manifest), and a suite's leaderboard and plots. Written as `report.html` (self-contained: styles and
images inline) and `report.md` (images beside it).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import shutil
from pathlib import Path

from embedstore.store import Store
from embedstore.store.info import store_info

SUITE_PLOTS = ("heatmap.png",)
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f0f0f0}td.best{font-weight:bold}img{max-width:100%;margin:.5em 0}"""


def write_store_report(store: Store, out: Path, suite: Path | None = None) -> tuple[Path, Path]:
    """Write DIR/report.html and DIR/report.md; returns both."""
    out.mkdir(parents=True, exist_ok=True)
    sections = store_sections(store, out)
    if suite is not None:
        sections += suite_sections(suite, out)
    title = f"embedstore report: {store.path}"
    markdown = "\n".join([f"# {title}", ""] + [block.markdown for block in sections])
    body = "\n".join(block.html for block in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    (out / "report.md").write_text(markdown + "\n")
    (out / "report.html").write_text(page)
    return out / "report.html", out / "report.md"


class Block:
    """A piece of the report in both forms."""

    def __init__(self, markdown: str, html_text: str):
        self.markdown, self.html = markdown, html_text


def heading(text: str) -> Block:
    return Block(f"## {text}\n", f"<h2>{html.escape(text)}</h2>")


def table(header: list[str], rows: list[list], bold: list[list[bool]] | None = None) -> Block:
    texts = [[cell if isinstance(cell, str) else format_number(cell) for cell in row] for row in rows]
    bold = bold or [[False] * len(header) for _ in rows]
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(f"**{t}**" if b else t for t, b in zip(row, marks)) + " |"
                            for row, marks in zip(texts, bold)]) + "\n"
    cells = "".join("<tr>" + "".join(f"<td{' class=best' if b else ''}>{html.escape(t)}</td>" for t, b in zip(row, marks))
                    + "</tr>" for row, marks in zip(texts, bold))
    return Block(markdown, "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + f"</tr>{cells}</table>")


def image(path: Path, caption: str) -> Block:
    """A PNG: inline in the HTML, beside report.md (copied there when it is elsewhere)."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return Block(f"![{caption}]({path.name})\n",
                 f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{encoded}'>"
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def paragraph(text: str) -> Block:
    return Block(text + "\n", f"<p>{html.escape(text)}</p>")


def format_number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def store_sections(store: Store, out: Path) -> list[Block]:
    info = store_info(store)
    blocks = [heading("Store"), paragraph(
        f"Format {info['format_version']}: {info['slices']:,} slices in {info['series']:,} series of "
        f"{info['studies']:,} studies; patch tokens {info['patch_bytes'] / 2 ** 20:,.1f} MiB. Modalities: "
        + (", ".join(f"{name} {n:,}" for name, n in info["modalities"].items()) or "none") + ".")]
    blocks.append(table(["model", "name", "dim", "size", "weights", "slices", "series", "studies", "patients"],
                        [[model_id, m["name"], m["embed_dim"], m["image_size"], m["weights"], m["slices"], m["series"],
                          m["studies"], m["patients"]] for model_id, m in info["models"].items()]))
    failures = info["failures_by_reason"]
    blocks.append(paragraph("Failures by reason: " + (", ".join(f"{reason} {n:,}" for reason, n in failures.items())
                                                      if failures else "none") + "."))
    blocks += run_sections(store, out) + index_sections(store)
    return blocks


def run_sections(store: Store, out: Path) -> list[Block]:
    runs = store.rows("runs", columns=["run_id", "model_ids", "started_at", "n_embedded", "n_failed", "slices_per_s",
                                       "stage_seconds"]).to_pylist()
    if not runs:
        return [heading("Ingest throughput"), paragraph("No ingest runs recorded.")]
    runs.sort(key=lambda run: run["started_at"])
    stages = [json.loads(run["stage_seconds"] or "{}") for run in runs]
    names = list(dict.fromkeys(name for stage in stages for name in stage))
    blocks = [heading("Ingest throughput"),
              table(["run", "started (UTC)", "models", "slices embedded", "failed", "slices/s", *names],
                    [[run["run_id"], run["started_at"].strftime("%Y-%m-%d %H:%M"), len(run["model_ids"]),
                      run["n_embedded"], run["n_failed"], run["slices_per_s"], *(stage.get(n) for n in names)]
                     for run, stage in zip(runs, stages)])]
    if names:
        plot_stages([f"{n}. {run['started_at'].strftime('%m-%d %H:%M:%S')}" for n, run in enumerate(runs, 1)], stages, names, out / "ingest-stages.png")
        blocks.append(image(out / "ingest-stages.png", "seconds per ingest stage, per run"))
    return blocks


def plot_stages(labels: list[str], stages: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from embedstore.eval.report import save_figure

    figure, axes = plt.subplots(figsize=(7, max(2.8, 0.45 * len(labels) + 2.0)), dpi=120)
    left = np.zeros(len(labels))
    for name in names:
        values = np.array([stage.get(name, 0.0) for stage in stages])
        axes.barh(labels, values, left=left, label=name)
        left += values
    axes.set_xlabel("seconds")
    axes.set_title("where ingest time went, per run", fontsize=9)
    axes.invert_yaxis()  # the first run on top
    axes.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    save_figure(figure, path)


def index_sections(store: Store) -> list[Block]:
    indexes = store.manifest.get("indexes", {})
    if not indexes:
        return [heading("Search indexes"), paragraph("No ANN index built (`embedstore index STORE`).")]
    return [heading("Search indexes"),
            table(["table.column", "type", "partitions", "probes", "rows", "recall@10", "ANN p50 ms", "exact p50 ms"],
                  [[name, entry["index_type"], entry["num_partitions"], entry["nprobes"], entry.get("rows"),
                    entry["recall_at_10"], entry.get("ann_p50_ms"), entry.get("exact_p50_ms")]
                   for name, entry in sorted(indexes.items())])]


def suite_sections(suite: Path, out: Path) -> list[Block]:
    """The leaderboard, paired comparisons and plots `embedstore bench` wrote into `suite`."""
    leaderboard = suite / "leaderboard.csv"
    if not leaderboard.is_file():
        return [heading("Benchmark suite"), paragraph(f"No leaderboard in {suite} (run `embedstore bench`).")]
    rows = list(csv.DictReader(open(leaderboard)))
    blocks = [heading("Benchmark suite"), paragraph(
        "Headline metric per dataset and protocol: mean (± std over seeds where more than one ran), the first "
        "seed's 95% interval by a "
        "bootstrap over test patients; bold: the best of its dataset and protocol."),
        table(["dataset", "protocol", "metric", "model", "mean ± std", "95% interval", "seeds"],
              [[r["dataset"], r["protocol"], r["metric"], r["model"],
                f"{float(r['mean']):.3f}" + (f" ± {float(r['std']):.3f}" if r["std"] else ""),
                f"[{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}]" if r["ci_low"] else "-", r["seeds"]]
               for r in rows],
              [[r["best"] == "True"] * 7 for r in rows])]
    paired = list(csv.DictReader(open(suite / "paired.csv"))) if (suite / "paired.csv").stat().st_size else []
    if paired:
        blocks += [paragraph(f"Against the baseline ({paired[0]['baseline']}) on the same test patients (paired "
                             "bootstrap of the difference):"),
                   table(["dataset", "protocol", "seed", "model", "metric", "difference", "95% interval"],
                         [[p["dataset"], p["protocol"], p["seed"], p["model"], p["metric"],
                           f"{float(p['difference']):+.3f}", f"[{float(p['ci_low']):+.3f}, {float(p['ci_high']):+.3f}]"]
                          for p in paired])]
    for plot in [suite / name for name in SUITE_PLOTS] + sorted(suite.glob("fewshot-*.png")):
        if plot.is_file():
            if plot.parent.resolve() != out.resolve():
                shutil.copyfile(plot, out / plot.name)
            blocks.append(image(out / plot.name, plot.stem.replace("-", " ")))
    return blocks
