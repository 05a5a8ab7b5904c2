"""Training throughput of `embedstore finetune` against a bare timm training loop on the same model, batch
size and image size (target: >= 0.85x).

Writes the stripes task (PNG, one patient per image) and ingests it with random ViT-S/14 weights, cached in
--workdir. Then, alternating A B A B in one run:
  A - `embedstore finetune STORE --mode MODE --head-lrs 0.01 --epochs E --batch-size B` in a fresh folder:
      its own training images/s (JSON `train_images_per_second`: every image trained on over the time of
      its trainings, reading back, decoding, augmenting, stepping and checkpointing every epoch included;
      val and test scoring excluded), for the val training and the final one together;
  B - a bare loop in a fresh process: timm's model with a 2-class head, SGD momentum 0.9, on random
      tensors already in memory, as many steps as A takes per training, in train mode.
Both use the default decode workers (0 on a CPU) and torch's threads. Prints each pair's rates, the
median ratio A / B, and one JSON line.

    python benchmarks/finetune.py [--n 96] [--image-size 112] [--batch-size 16] [--epochs 2] [--mode full]
                                  [--repeats 3] [--workdir /tmp/embedstore-finetune-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BARE_LOOP = """
import sys, time, timm, torch
size, batch, steps, warmup = map(int, sys.argv[1:5])
model = timm.create_model("vit_small_patch14_dinov2", img_size=size, num_classes=2).train()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
images, targets = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
for step in range(warmup + steps):
    if step == warmup:
        started = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
print(steps * batch / (time.perf_counter() - started))
"""


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def embedstore_command() -> str:
    return str(Path(sys.executable).parent / "embedstore")


def task_store(workdir: Path, n: int, image_size: int) -> tuple[Path, Path]:
    root = workdir / f"stripes-{n}-{image_size}"
    store, labels = root / "store", root / "task" / "labels.csv"
    if not (root / "ready").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from embedstore import samples

        shutil.rmtree(root, ignore_errors=True)
        samples.write_stripes_task(root / "task", n, image_size)
        subprocess.run([embedstore_command(), "ingest", str(root / "task" / "images"), "--store", str(store),
                        "--weights", "random", "--image-size", str(image_size), "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        (root / "ready").touch()
    return store, labels


def finetune_rate(store: Path, labels: Path, out: Path, args) -> tuple[float, int]:
    """(training images/s, steps per training) of one `embedstore finetune` run."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([embedstore_command(), "finetune", str(store), "--labels", str(labels), "--split-by", "patient",
                    "--mode", args.mode, "--head-lrs", "0.01", "--epochs", str(args.epochs), "--batch-size",
                    str(args.batch_size), "--out", str(out), "-o", str(out) + ".json"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(Path(str(out) + ".json").read_text())
    steps = args.epochs * (result["counts"]["train"] // args.batch_size)
    return result["train_images_per_second"], steps


def bare_rate(image_size: int, batch_size: int, steps: int) -> float:
    completed = subprocess.run([sys.executable, "-c", BARE_LOOP, str(image_size), str(batch_size), str(steps), "2"],
                               check=True, capture_output=True, text=True)
    return float(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=96, help="images in the task")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--mode", default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/embedstore-finetune-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    store, labels = task_store(args.workdir, args.n, args.image_size)
    pairs = []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        finetune, steps = finetune_rate(store, labels, args.workdir / "run", args)
        bare = bare_rate(args.image_size, args.batch_size, steps)
        pairs.append((finetune, bare))
        note(f"pair {repeat + 1}/{args.repeats}: finetune {finetune:.2f} images/s, bare timm loop {bare:.2f} images/s "
             f"({time.perf_counter() - started:.0f} s)")
    ratios = [a / b for a, b in pairs]
    print(f"mode {args.mode}, ViT-S/14 at {args.image_size} px, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.n} images")
    print(f"finetune images/s: {', '.join(f'{a:.2f}' for a, _ in pairs)}")
    print(f"bare timm loop images/s: {', '.join(f'{b:.2f}' for _, b in pairs)}")
    print(f"ratio finetune / bare (median of {len(ratios)} pairs): {statistics.median(ratios):.3f} (target >= 0.85)")
    print(json.dumps({"mode": args.mode, "image_size": args.image_size, "batch_size": args.batch_size,
                      "finetune_images_per_second": [a for a, _ in pairs], "bare_images_per_second": [b for _, b in pairs],
                      "median_ratio": statistics.median(ratios)}))


if __name__ == "__main__":
    main()
