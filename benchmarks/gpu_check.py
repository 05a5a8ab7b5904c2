"""GPU check: model-only images/s with MFU, and where every millisecond of the decode → embed pipeline goes.

Needs only torch, timm, numpy and pydicom (embedstore is imported from this checkout); whatever else
is missing is skipped with the reason printed. Run through `benchmarks/gpu_check.sh`.

Model only (random weights: speed does not depend on them): ViT-S/14, ViT-B/14 and ViT-L/14 at 224 px
and ViT-B/14 at 518 px (RAD-DINO's size), in eager fp32, bf16 and fp16, compile bf16 (ViT-B at 224
only: compiling takes a minute a model) and, where torch-tensorrt is installed, TensorRT fp16, each
with its cosine to eager fp32 (the parity gate an ingest applies, models/engines.py). MFU = achieved
FLOP/s over the GPU's dense peak for that precision, FLOPs per image counted from the architecture
(ViT-B/14 at 224: 46 GFLOP).

Pipeline: generated uncompressed 512×512 16-bit CT DICOM files read by embedstore's reader in decode
worker processes that only decode (DecodePool), batched, copied to the device and mapped there (HU
window, resize to 224: --preprocess-on device, what an ingest does on CUDA), embedded by embedstore's
Embedder in bf16. Per slice: the workers' CPU time, the wait for them, the H2D copy with the mapping,
the forward with its D2H copy (the device synchronised between stages), GPU utilisation sampled
through NVML where it answers; then the same slices as an ingest runs them, one batch ahead (the next
batch copied and mapped on a stream of its own during the forward, nothing synchronised): the
end-to-end rate. Then, where lancedb and zarr are importable (it says which), the same
through the ingest's own UnitRunner (embed, patch shards) and RowCommitter (LanceDB rows), with their
stage times (write, commit). Last, the worst cosine between the patch_mean of the same slices mapped
on the CPU and on the device.

Fine-tune: `embedstore finetune`'s training loop (rows read back from generated DICOM in decode
workers, augmented, a full fine-tune of ViT-B/14 in bf16, checkpoints per epoch) against a bare timm
loop on tensors already on the GPU, same batch and image size (target >= 0.85x).

    python benchmarks/gpu_check.py [--smoke]     # --smoke: tiny sizes on the CPU, to test the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # embedstore from this checkout

# Dense peak FLOP/s by precision (no sparsity); H200 has the H100's compute.
PEAK_FLOPS = {
    "H100": {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12},
    "H200": {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12},
    "A100": {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12},
}
# (name, image size, batch size): ViT-S/B/L at 224, and ViT-B at 518 (RAD-DINO's input size)
MODELS = [("dinov2_vits14", 224, 512), ("dinov2_vitb14", 224, 256), ("dinov2_vitl14", 224, 128),
          ("dinov2_vitb14", 518, 32)]
COMPILED = ("dinov2_vitb14", 224)  # torch.compile takes a minute a model: measured on this one only


def vit_flops_per_image(model) -> float:
    """2 × multiply-adds of the transformer blocks: per block 12·N·D² (qkv, projection, MLP with
    ratio 4) + 2·N²·D (attention), N tokens including CLS and registers."""
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    dim, depth = model.embed_dim, len(model.blocks)
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / dim
    per_block = (4 + 2 * mlp_ratio) * tokens * dim * dim + 2 * tokens * tokens * dim
    return 2.0 * depth * per_block


def peak_flops(device_name: str, precision: str) -> float | None:
    for key, peaks in PEAK_FLOPS.items():
        if key in device_name:
            return peaks[precision]
    return None


def images_per_second(forward, batch, iterations: int) -> float:
    import torch

    for _ in range(3):  # warm-up (and, for compile, the compilation itself)
        forward(batch)
    torch.cuda.synchronize() if batch.is_cuda else None
    started = time.perf_counter()
    for _ in range(iterations):
        forward(batch)
    torch.cuda.synchronize() if batch.is_cuda else None
    return iterations * len(batch) / (time.perf_counter() - started)


def model_only(name: str, batch_size: int, image_size: int, device, iterations: int, results: list) -> None:
    import torch

    from embedstore.models.build import load_model
    from embedstore.models.engines import MIN_COSINE, EmbeddingForward, worst_cosine

    loaded = load_model(name, "random", image_size)
    # what ingest runs: pooled CLS, patch mean, CLS of the last 4 blocks, patch tokens of the last
    module = EmbeddingForward(loaded.model.to(device).eval(), loaded.spec)
    flops = vit_flops_per_image(loaded.model)
    batch = torch.randn(batch_size, 3, image_size, image_size, device=device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    modes = [("eager", "fp32"), ("eager", "bf16"), ("eager", "fp16"), ("compile", "bf16"), ("tensorrt", "fp16")]
    if (name, image_size) != COMPILED and device.type == "cuda":
        modes.remove(("compile", "bf16"))
    with torch.inference_mode():
        reference = module(batch)
    for engine, precision in modes:
        row = {"model": name, "image_size": image_size, "engine": engine, "precision": precision, "batch": batch_size,
               "gflop_per_image": round(flops / 1e9, 1)}
        try:
            forward = build_forward(module, engine, precision, batch, device)
            with torch.inference_mode():
                rate = images_per_second(forward, batch, iterations)
                # the parity gate an ingest applies (models/engines.py): CLS and patch mean against eager fp32
                row["cosine_to_eager_fp32"] = round(worst_cosine(reference[:2], forward(batch)[:2]), 6)
        except Exception as error:  # a missing package or an unsupported GPU: say so, go on
            row["skipped"] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
            results.append(row)
            print(f"{name:15s} {image_size:4d} {engine:9s} {precision:5s} skipped: {row['skipped']}", flush=True)
            continue
        peak = peak_flops(device_name, precision)
        row.update(images_per_s=round(rate, 1), tflops=round(rate * flops / 1e12, 1),
                   mfu=round(rate * flops / peak, 3) if peak else None)
        results.append(row)
        print(f"{name:15s} {image_size:4d} {engine:9s} {precision:5s} {rate:9.1f} images/s  "
              f"{rate * flops / 1e12:6.1f} TFLOP/s  MFU {row['mfu'] if peak else 'n/a (unknown peak)'}  cosine to "
              f"eager fp32 {row['cosine_to_eager_fp32']}{'' if row['cosine_to_eager_fp32'] >= MIN_COSINE else ' FAILS'}",
              flush=True)
    del module
    torch.cuda.empty_cache() if device.type == "cuda" else None


def build_forward(module, engine: str, precision: str, batch, device):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if engine == "tensorrt":
        if device.type != "cuda":
            raise RuntimeError("TensorRT needs CUDA")
        import torch_tensorrt

        compiled = torch_tensorrt.compile(module, ir="dynamo", inputs=[batch],
                                          enabled_precisions={torch.float16, torch.float32})
        return lambda x: compiled(x)
    target = torch.compile(module, dynamic=False) if engine == "compile" else module
    if dtype == torch.float32:
        return target

    def autocast_forward(x):
        with torch.autocast(device_type=device.type, dtype=dtype):
            return target(x)

    return autocast_forward


def pipeline(n_slices: int, image_size: int, batch_size: int, device, results: dict) -> None:
    """Generated DICOM → embedstore's DecodePool (the workers only decode on CUDA) → the batcher (H2D copy,
    window and resize on the device) → Embedder, timed per stage; then, where lancedb and zarr exist,
    the same through the ingest's UnitRunner and RowCommitter into a store (write and commit)."""
    import torch

    from embedstore.models.build import load_model
    from embedstore.models.embedder import Embedder
    from embedstore.pipeline.decode import DecodePool
    from embedstore.preprocess import DecodeSettings

    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    with tempfile.TemporaryDirectory() as scratch:
        tasks = ct_tasks(Path(scratch), n_slices)
        loaded = load_model("dinov2_vitb14", "random", image_size)
        spec = loaded.spec
        embedder = Embedder(loaded, str(device), "bf16", "eager", batch_size)
        # The workers only decode; the window and the resize run batched on the model's device, as an ingest
        # on CUDA does (--preprocess-on auto); --smoke runs that path on the CPU
        settings = DecodeSettings(spec.intensity, image_size, (spec.interpolation,), on_device=True)
        with DecodePool(workers, settings) as pool:
            list(pool.decode(tasks[:workers * 8]))  # workers up and warm before the clock starts
            pool.stage_seconds.clear()
            embedder.embed(torch.zeros(batch_size, 3, image_size, image_size), keep_patches=False)  # kernels warm
            with UtilisationSampler(device) as sampler:
                stages, n_embedded, seconds = staged_pass(pool, tasks, embedder, settings, batch_size)
            rate = n_embedded / seconds
            stages["host_decode_cpu_ms_per_slice"] = 1e3 * sum(pool.stage_seconds.values()) / n_embedded
            with UtilisationSampler(device) as overlapped_sampler:
                n_overlapped, overlapped_seconds = overlapped_pass(pool, tasks, embedder, settings, batch_size)
            results.update(slices=n_embedded, decode_workers=workers, preprocess_on_device=settings.on_device,
                           slices_per_s=round(rate, 1), gpu_utilisation=sampler.summary(),
                           stages_ms_per_slice={name: round(value, 3) for name, value in stages.items()},
                           overlapped={"slices": n_overlapped,
                                       "slices_per_s": round(n_overlapped / overlapped_seconds, 1),
                                       "gpu_utilisation": overlapped_sampler.summary()})
            print(f"pipeline: {n_embedded} DICOM slices 512x512 → dinov2_vitb14 bf16 at {image_size}px, {workers} "
                  f"decode workers, mapping on the {'device' if settings.on_device else 'workers'}: {rate:.1f} "
                  f"slices/s stage by stage; ms a slice by stage {results['stages_ms_per_slice']}; GPU busy "
                  f"{sampler.summary()}; overlapped as an ingest runs (one batch ahead, no synchronisation): "
                  f"{results['overlapped']}", flush=True)
            sink, write_note = store_sink(Path(scratch) / "store", loaded, embedder, batch_size, settings)
            if sink is not None:
                started = time.perf_counter()
                committed = sink.run(pool, tasks)
                torch.cuda.synchronize() if device.type == "cuda" else None
                results["with_store"] = {"slices_per_s": round(committed / (time.perf_counter() - started), 1),
                                         "stage_ms_per_slice": sink.stage_ms(committed)}
            results["store_write"] = write_note
            print(f"pipeline with the store: {results.get('with_store', write_note)}", flush=True)
        results["cpu_vs_device_patch_mean_cosine"] = placement_cosine(tasks[:2 * batch_size], embedder, settings)
        print(f"patch_mean of the same slices mapped on the CPU and on {device}: worst cosine "
              f"{results['cpu_vs_device_patch_mean_cosine']}", flush=True)


def ct_tasks(folder: Path, n_slices: int, per_series: int = 64) -> list:
    """Uncompressed 512×512 CT slices written in series of `per_series` (not timed), as read tasks."""
    from embedstore import samples
    from embedstore.sources.records import ReadTask, SliceItem

    paths = []
    for series in range(0, n_slices, per_series):
        paths += samples.write_ct_series(folder / f"s{series}", n_slices=min(per_series, n_slices - series),
                                         size=512, seed=series, shuffle_names=False)
    return [ReadTask("dicom", str(p), [SliceItem(f"dicom:{p}:0", str(p), "study", f"series{i // per_series}",
                                                 i % per_series, modality="CT")]) for i, p in enumerate(paths)]


def staged_pass(pool, tasks, embedder, settings, batch_size: int) -> tuple[dict, int, float]:
    """Every task decoded, batched and embedded, with the wall time a slice of each stage: waiting for
    the workers, the batch's H2D copy and mapping on the device, the forward with its D2H copy (the
    device is synchronised around each, so a stage's time is its own)."""
    import torch

    from embedstore.inference.batching import SliceBatcher

    sync = torch.cuda.synchronize if embedder.device.type == "cuda" else (lambda: None)
    batcher = SliceBatcher(batch_size, settings, embedder.device)
    spent = {"wait_decode": 0.0, "h2d_and_map": 0.0, "forward_and_d2h": 0.0}
    n_embedded = 0
    started = clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        sync()
        now = time.perf_counter()
        spent[stage] += now - clock
        clock = now

    def embed() -> int:
        items, pixels = batcher.take()
        lap("h2d_and_map")
        embedder.embed(pixels[settings.interpolations[0]], keep_patches=False)
        lap("forward_and_d2h")
        return len(items)

    for _, decoded in pool.decode(tasks):
        lap("wait_decode")
        if isinstance(decoded, list):
            raise RuntimeError(f"a generated slice failed to decode: {decoded[0].message}")
        batcher.add(decoded)
        while batcher.full():
            n_embedded += embed()
    if batcher.pending():
        n_embedded += embed()
    seconds = time.perf_counter() - started
    return {f"{stage}_ms_per_slice": 1e3 * value / n_embedded for stage, value in spent.items()}, n_embedded, seconds


def overlapped_pass(pool, tasks, embedder, settings, batch_size: int, unit_slices: int = 256) -> tuple[int, float]:
    """Every task decoded and embedded as the ingest's UnitRunner does it: a unit's decoded files
    batched, batch k+1 copied and mapped on the batcher's stream while batch k's forward runs
    (inference.batching.one_batch_ahead), nothing synchronised but the vectors' D2H. Slices, seconds."""
    import torch

    from embedstore.inference.batching import SliceBatcher, one_batch_ahead

    batcher = SliceBatcher(batch_size, settings, embedder.device)

    def launch(batch):
        items, pixels = batch
        return len(items), embedder.launch(pixels[settings.interpolations[0]], keep_patches=False)

    def collect(launched) -> int:
        slices, outputs = launched
        outputs.collect()
        return slices

    n_embedded = 0
    started = time.perf_counter()
    for _, decoded in pool.decode(tasks):
        if isinstance(decoded, list):
            raise RuntimeError(f"a generated slice failed to decode: {decoded[0].message}")
        batcher.add(decoded)
        if batcher.pending() >= unit_slices:
            n_embedded += sum(one_batch_ahead(batcher.take, launch, collect))
    n_embedded += sum(one_batch_ahead(batcher.take, launch, collect))
    torch.cuda.synchronize() if embedder.device.type == "cuda" else None
    return n_embedded, time.perf_counter() - started


def placement_cosine(tasks, embedder, settings) -> float:
    """The worst cosine between the patch_mean of slices mapped in the workers (on the CPU) and on the
    model's device, both embedded on the device: the two placements' kernels differ by float rounding."""
    from dataclasses import replace

    import numpy as np

    from embedstore.inference.batching import SliceBatcher
    from embedstore.preprocess import decode_task

    vectors = []
    for on_device in (False, True):
        batcher = SliceBatcher(len(tasks), replace(settings, on_device=on_device), embedder.device)
        for task in tasks:
            batcher.add(decode_task(task, replace(settings, on_device=on_device)))
        _, pixels = batcher.take()
        vectors.append(embedder.embed(pixels[settings.interpolations[0]], keep_patches=False).patch_mean)
    cpu, device = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in vectors)
    return round(float((cpu * device).sum(axis=1).min()), 6)


class UtilisationSampler:
    """GPU utilisation sampled every 0.1 s (torch.cuda.utilization, through NVML) while the block runs."""

    def __init__(self, device):
        self.device, self.samples, self.problem = device, [], None

    def __enter__(self) -> "UtilisationSampler":
        import threading

        import torch

        self._stop = threading.Event()
        if self.device.type != "cuda":
            self.problem = "no CUDA device"
            return self
        try:
            torch.cuda.utilization(self.device)
        except Exception as error:  # pynvml missing, or NVML unavailable in this container
            self.problem = f"not sampled: {type(error).__name__}: {error}"[:160]
            return self

        def sample() -> None:
            while not self._stop.wait(0.1):
                self.samples.append(torch.cuda.utilization(self.device))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.samples:
            self._thread.join()

    def summary(self) -> dict | str:
        if not self.samples:
            return self.problem or "no samples"
        return {"mean_percent": round(sum(self.samples) / len(self.samples), 1), "min_percent": min(self.samples),
                "samples": len(self.samples)}


class StoreSink:
    """Decoded work units into an embedstore store the way the local distributor does it: the
    UnitRunner embeds each unit and writes its patch shard, the RowCommitter commits the items and
    vector rows in large transactions."""

    RUN_ID = "gpu-check-run"

    def __init__(self, path: Path, loaded, embedder, batch_size: int, settings):
        from embedstore.pipeline.ingest import DEFAULT_COMMIT_ROWS
        from embedstore.pipeline.runner import RowCommitter, UnitRunner
        from embedstore.store import Store

        self.store = Store.open(path, create=True)
        self.store.add_model(loaded.spec)
        self.spec = loaded.spec
        self.runner = UnitRunner([loaded], [embedder], self.store.patches_root, self.RUN_ID, batch_size, settings)
        self.committer = RowCommitter(self.store, self.RUN_ID, [loaded.model_id], DEFAULT_COMMIT_ROWS, Counter())

    def run(self, pool, tasks) -> int:
        """Every task through the runner and committer; the rows committed."""
        from embedstore.pipeline.local import embed_locally
        from embedstore.pipeline.progress import IngestProgress
        from embedstore.pipeline.runner import UNIT_SLICES, WorkUnit, unit_slices_for

        size = unit_slices_for([self.spec], UNIT_SLICES)
        units = [WorkUnit(n, tasks[start:start + size],
                          [{item.item_id for task in tasks[start:start + size] for item in task.items}])
                 for n, start in enumerate(range(0, len(tasks), size))]
        with IngestProgress(sum(unit.n_items for unit in units), enabled=False) as progress:
            embed_locally(self.runner, pool, units, progress, self.committer)
        if self.committer.failures:
            raise RuntimeError(f"a generated slice failed: {self.committer.failures[0].message}")
        return self.committer.committed[self.spec.model_id]

    def stage_ms(self, slices: int) -> dict[str, float]:
        """Milliseconds a slice of each stage the runner and committer recorded (decode: summed over workers)."""
        return {stage: round(1e3 * seconds / slices, 3) for stage, seconds in self.committer.stage_seconds.items()}


def store_sink(path: Path, loaded, embedder, batch_size: int, settings) -> tuple[StoreSink | None, str]:
    """The ingest's runner and committer into an embedstore store, or None and why not."""
    try:
        return StoreSink(path, loaded, embedder, batch_size, settings), \
            "store write measured (LanceDB rows and Zarr patches, by UnitRunner and RowCommitter)"
    except ImportError as error:
        return None, f"store write not measured: {error.name} is not installed"


def finetune_throughput(name: str, n_slices: int, image_size: int, batch_size: int, device, results: dict) -> None:
    """`embedstore finetune`'s training loop (read back from generated DICOM in decode workers, augmented,
    full fine-tune in bf16, a checkpoint per epoch) against a bare timm loop on tensors already on the
    GPU, same model, batch and image size. The store is not needed: the rows are given directly."""
    import timm
    import torch

    from embedstore import samples
    from embedstore.finetune.data import SliceImages
    from embedstore.finetune.modes import prepare_backbone
    from embedstore.finetune.train import Classifier, TrainSettings, Workers, train
    from embedstore.models.build import load_model

    with tempfile.TemporaryDirectory() as scratch:
        paths = samples.write_ct_series(Path(scratch) / "ct", n_slices=n_slices, size=512, shuffle_names=False)
        items = [{"key": f"dicom:{p}:0", "path": str(p), "frame": 0, "kind": "dicom", "axis": None, "study_uid": "study",
                  "series_uid": "series", "slice_index": i, "modality": "CT", "body_part": None}
                 for i, p in enumerate(paths)]
        loaded = load_model(name, "random", image_size)
        classifier = Classifier(prepare_backbone(loaded.model, "full"), loaded.spec, 2, 1)
        images = SliceImages(items, [i % 2 for i in range(n_slices)], loaded.spec, augment=True)
        settings = TrainSettings("full", epochs=2, batch_size=batch_size,
                                 decode_workers=max(1, min(8, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0)
        stats = train(classifier, images, [0.01], settings, False, Workers(device=device), Path(scratch) / "ckpt.pt")
        del classifier
        model = timm.create_model(loaded.spec.timm_name.split(".")[0], img_size=image_size, num_classes=2).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        batch = torch.randn(batch_size, 3, image_size, image_size, device=device)
        targets = torch.randint(0, 2, (batch_size,), device=device)
        steps = 2 * (n_slices // batch_size)
        for step in range(steps + 3):
            if step == 3:  # warmed up
                torch.cuda.synchronize() if device.type == "cuda" else None
                started = time.perf_counter()
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(batch), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        torch.cuda.synchronize() if device.type == "cuda" else None
        bare = steps * batch_size / (time.perf_counter() - started)
    results.update(model=name, batch=batch_size, decode_workers=settings.decode_workers,
                   finetune_images_per_s=round(stats.images_per_second, 1), bare_images_per_s=round(bare, 1),
                   ratio=round(stats.images_per_second / bare, 3))
    print(f"finetune {name} full bf16 batch {batch_size}: {stats.images_per_second:.1f} images/s (2 epochs, "
          f"decode and checkpoints included) vs bare timm loop {bare:.1f} images/s: ratio "
          f"{stats.images_per_second / bare:.3f} (target >= 0.85)", flush=True)
    torch.cuda.empty_cache() if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script runs")
    args = parser.parse_args()
    import torch

    if torch.cuda.is_available():
        device, image_size, iterations, n_slices = torch.device("cuda"), 224, 20, 3072
        models = MODELS
    elif args.smoke:
        device, image_size, iterations, n_slices = torch.device("cpu"), 28, 1, 24
        models = [("dinov2_vits14", 28, 4)]
    else:
        print("no CUDA device: nothing to measure (use --smoke to test the script on the CPU)")
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    result = {"benchmark": "gpu_check", "device": name, "model_only": [], "pipeline": {}, "finetune": {}}
    for model, size, batch_size in models:
        model_only(model, batch_size, size, device, iterations, result["model_only"])
    pipeline(n_slices, image_size, 256 if device.type == "cuda" else 8, device, result["pipeline"])
    finetune_throughput("dinov2_vitb14" if device.type == "cuda" else "dinov2_vits14", n_slices // 2, image_size,
                        64 if device.type == "cuda" else 4, device, result["finetune"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
