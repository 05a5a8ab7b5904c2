"""Segmentation probes on stored patch tokens: the training loop reading the store's Zarr shards against the
same loop on tokens already in memory, and the peak memory of `embedstore eval segment` on a small and a
large store.

Writes PNG phantoms with masks (ellipses of two classes on noise) and ingests them with random ViT-S/14
weights, keeping the patch tokens of the last 5 blocks: a store of --small slices and one of --n. Both are
cached in --workdir and reused by later runs (the --n store takes minutes to ingest on a CPU). Then measures,
alternating in one run:
  speed  - one epoch of train_decoders (the seven learning rates together, batch 32, seed 0) over the train
           split, its tokens read from the Zarr shards (StoredTokens) or from memory (InMemoryTokens, loaded
           beforehand: its load time is reported apart, not counted); the linear decoder on the --n store, the
           UNet (seven UNets at the image size, slow on a CPU) on --unet-rows train slices of the --small
           store drawn at random, so that its epochs still read from every chunk
  memory - peak RSS of `embedstore eval segment --epochs 1` (linear decoder), a fresh process each time,
           on the --small and on the --n store
Prints the rates, their ratios (targets: stored / in memory >= 0.8, RSS --n / --small <= 1.5), what the --n
store's tokens would take held in memory, and one JSON line.

    python benchmarks/segment.py [--n 2000] [--small 200] [--unet-rows 64] [--image-size 224] [--repeats 3]
                                 [--workdir /tmp/embedstore-segment-bench] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATCH_LAYERS = "-5,-4,-3,-2,-1"  # what the UNet decoder reads
BATCH_SIZE = 32
MIB = 1024 * 1024
# A fresh process tree per measurement: RUSAGE_CHILDREN's ru_maxrss (KiB on Linux) is then the command's peak.
PEAK_RSS_PROBE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                  "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def note(text: str) -> None:
    """Where a long run is, on stderr: stdout keeps the table and the JSON line."""
    print(text, file=sys.stderr, flush=True)


def embedstore_command() -> str:
    return str(Path(sys.executable).parent / "embedstore")


def phantom_store(workdir: Path, n: int, image_size: int) -> tuple[Path, Path]:
    """(store, labels CSV) of n phantom slices, ingested unless an earlier run left them complete in `workdir`."""
    from embedstore.samples import write_segmentation_phantoms

    archive, store = workdir / f"archive-{n}", workdir / f"store-{n}-{image_size}px"
    summary_path = store.with_suffix(".json")  # written by the ingest when it ends: the store is complete
    if summary_path.exists() and (archive / "labels.csv").exists():
        return store, archive / "labels.csv"
    labels = write_segmentation_phantoms(archive, n_images=n, size=64)
    note(f"ingesting {n} phantoms into {store} ...")
    started = time.perf_counter()
    subprocess.run([embedstore_command(), "ingest", str(archive / "images"), "--store", str(store),
                    "--weights", "random", "--image-size", str(image_size), "--patch-layers", PATCH_LAYERS,
                    "--overwrite", "--no-progress", "--json", str(summary_path)], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(summary_path.read_text())
    assert summary["n_embedded"] == n, summary
    note(f"  {n / (time.perf_counter() - started):.1f} slices/s")
    return store, labels


def training_inputs(store_path: Path, labels: Path, decoder: str):
    """(stored tokens, labelled set, decoder shape) of a store, for `decoder`'s blocks."""
    from embedstore.eval.segment.data import segmentation_set
    from embedstore.eval.segment.protocol import required_blocks
    from embedstore.eval.segment.tokens import StoredTokens
    from embedstore.eval.segment.train import DecoderShape
    from embedstore.store import Store

    store = Store.open(store_path)
    spec = store.spec(store.resolve_model_id(None))
    data = segmentation_set(store, spec, labels, split_by="patient")
    shape = DecoderShape(spec.embed_dim, spec.grid, max(data.class_names) + 1, spec.image_size)
    return StoredTokens(store.patches_root, data.rows, required_blocks(spec, decoder)), data, shape


def epoch_seconds(source, data, indices, shape, decoder: str) -> float:
    from embedstore.eval.segment.train import LEARNING_RATES, TrainSettings, train_decoders

    settings = TrainSettings(decoder=decoder, epochs=1, batch_size=BATCH_SIZE)
    started = time.perf_counter()
    train_decoders(source, data.input_masks, indices, shape, settings, LEARNING_RATES, seed=0)
    return time.perf_counter() - started


def train_rows(data, limit: int | None):
    """The train split's rows, or `limit` of them drawn at random (seed 0) in storage order: an epoch
    over them reads from the same chunks as one over all of them would, each for fewer rows."""
    import numpy as np

    train = data.indices("train")
    if limit is None or limit >= len(train):
        return train
    return np.sort(np.random.default_rng(0).choice(train, limit, replace=False))


def speed(store_path: Path, labels: Path, decoder: str, repeats: int, limit: int | None = None) -> dict:
    """One epoch's slices/s over the train split (or `limit` of its rows), stored and in memory alternately,
    and the in-memory load time."""
    from embedstore.eval.segment.tokens import InMemoryTokens

    note(f"timing {decoder} epochs on {store_path.name} ...")
    stored, data, shape = training_inputs(store_path, labels, decoder)
    train = train_rows(data, limit)
    started = time.perf_counter()
    in_memory = InMemoryTokens(stored, len(data.rows))
    load_seconds = time.perf_counter() - started
    epoch_seconds(in_memory, data, train[:BATCH_SIZE], shape, decoder)  # warm-up (imports, thread pools), discarded
    rates = {"stored": [], "in_memory": []}
    for _ in range(repeats):
        for name, source in (("stored", stored), ("in_memory", in_memory)):
            rates[name].append(len(train) / epoch_seconds(source, data, train, shape, decoder))
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {"rows": len(train), "of_rows": len(data.indices("train")), "blocks": len(stored.blocks),
            "load_seconds": load_seconds, "runs": rates, "stored": median["stored"], "in_memory": median["in_memory"],
            "ratio": median["stored"] / median["in_memory"]}


def peak_rss_mib(store: Path, labels: Path) -> float:
    command = [embedstore_command(), "eval", "segment", str(store), "--labels", str(labels), "--split-by", "patient",
               "--epochs", "1", "--batch-size", str(BATCH_SIZE)]
    probe = subprocess.run([sys.executable, "-c", PEAK_RSS_PROBE, *command], check=True, stdout=subprocess.PIPE,
                           text=True)  # its stderr passes through: a failing command says why
    return int(probe.stdout.strip()) * 1024 / MIB


def memory(small: tuple[Path, Path], large: tuple[Path, Path], repeats: int) -> dict:
    """Peak RSS of `eval segment` on each store, alternating small and large."""
    note("peak RSS of eval segment ...")
    runs = {"small": [], "large": []}
    for _ in range(repeats):
        for name, (store, labels) in (("small", small), ("large", large)):
            runs[name].append(peak_rss_mib(store, labels))
    median = {name: statistics.median(values) for name, values in runs.items()}
    return {"runs": runs, "small": median["small"], "large": median["large"],
            "ratio": median["large"] / median["small"]}


def tokens_in_memory_mib(store_path: Path, n: int) -> float:
    """What all n slices' stored patch tokens (every kept block, float16) would take in memory."""
    from embedstore.store import Store

    store = Store.open(store_path)
    spec = store.spec(store.resolve_model_id(None))
    return n * len(spec.patch_layers) * spec.grid[0] * spec.grid[1] * spec.embed_dim * 2 / MIB


def speed_figures(decoder: str, figures: dict) -> dict:
    return {f"{decoder}_train_rows": figures["rows"],
            f"{decoder}_stored_slices_per_s": round(figures["stored"], 2),
            f"{decoder}_in_memory_slices_per_s": round(figures["in_memory"], 2),
            f"{decoder}_ratio": round(figures["ratio"], 4),
            f"{decoder}_in_memory_load_s": round(figures["load_seconds"], 2)}


def print_speed(label: str, figures: dict) -> None:
    print(f"{label} ({figures['rows']} of {figures['of_rows']} train slices, {figures['blocks']} block(s); "
          f"in-memory load {figures['load_seconds']:.1f} s, not counted)")
    for name in ("stored", "in_memory"):
        print(f"  {name.replace('_', ' '):40s} {figures[name]:8.1f} slices/s   runs "
              f"{[round(r, 1) for r in figures['runs'][name]]}")
    print(f"  {'ratio stored / in memory':40s} {figures['ratio']:8.3f}   (target >= 0.8)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="slices of the large store")
    parser.add_argument("--small", type=int, default=200, help="slices of the small store")
    parser.add_argument("--unet-rows", type=int, default=64,
                        help="train slices of the --small store in the UNet epochs (seven UNets are slow on a CPU)")
    parser.add_argument("--image-size", type=int, default=224)
    # 3: on a shared machine one run in a pair is now and then twice as slow, and a median of 2 is their mean
    parser.add_argument("--repeats", type=int, default=3, help="alternating stored / in-memory (small / large) pairs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/embedstore-segment-bench"),
                        help="where the phantom archives and stores are cached between runs")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak RSS runs of `eval segment`")
    args = parser.parse_args()

    import torch

    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    small = phantom_store(args.workdir, args.small, args.image_size)
    large = phantom_store(args.workdir, args.n, args.image_size)
    linear = speed(*large, "linear", args.repeats)
    unet = speed(*small, "unet", args.repeats, args.unet_rows)
    rss = None if args.skip_memory else memory(small, large, args.repeats)
    tokens_mib = tokens_in_memory_mib(large[0], args.n)

    print(f"phantoms {args.small} / {args.n} slices -> dinov2_vits14 (random) at {args.image_size}, patch layers "
          f"{PATCH_LAYERS}, one epoch, 7 learning rates, batch {BATCH_SIZE}, torch threads {torch.get_num_threads()}")
    print_speed(f"linear decoder, {args.n}-slice store", linear)
    print_speed(f"unet decoder, {args.small}-slice store", unet)
    if rss:
        print("peak RSS of `embedstore eval segment --epochs 1` (linear decoder)")
        for name, n in (("small", args.small), ("large", args.n)):
            print(f"  {f'{n} slices':40s} {rss[name]:8.0f} MiB   runs {[round(r) for r in rss['runs'][name]]}")
        print(f"  {'ratio large / small':40s} {rss['ratio']:8.3f}   (target <= 1.5)")
    print(f"all {args.n} slices' stored tokens (every kept block, float16) held in memory: {tokens_mib:,.0f} MiB")
    print(json.dumps({
        "benchmark": "segment", "n_small": args.small, "n_large": args.n, "image_size": args.image_size,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        **speed_figures("linear", linear), **speed_figures("unet", unet),
        "peak_rss_mib_small": rss and round(rss["small"], 1), "peak_rss_mib_large": rss and round(rss["large"], 1),
        "rss_ratio": rss and round(rss["ratio"], 4), "tokens_in_memory_mib": round(tokens_mib, 1)}))


if __name__ == "__main__":
    main()
