"""Data-parallel fine-tuning with Ray Train: a `TorchTrainer` runs the same protocol in every worker
(one per GPU; gloo on CPUs, NCCL on GPUs), the model wrapped in DDP by `prepare_model`. Rank 0 scores,
checkpoints and writes the run folder, which must be on storage every worker sees (as the store and
its images must be when joining a cluster)."""

from __future__ import annotations

from pathlib import Path

from embedstore.finetune.data import FinetuneData
from embedstore.finetune.run import RunFolder, finetune_protocol
from embedstore.finetune.train import TrainSettings, Workers
from embedstore.pipeline.on_ray import start_ray


def train_worker(config: dict) -> None:
    """One Ray Train worker: its rank's share of every batch, through the shared protocol."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    workers = Workers(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                      ray.train.torch.prepare_model)
    folder = RunFolder(Path(config["folder"]))
    finetune_protocol(config["data"], config["settings"], folder, config["weights"], workers, log=folder.log)


def finetune_on_ray(data: FinetuneData, settings: TrainSettings, folder: RunFolder, weights: str | None,
                    n_workers: int, address: str | None) -> None:
    """Run the protocol on `n_workers` Ray Train workers (GPUs where the cluster has them)."""
    start_ray(address)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = ray.cluster_resources().get("GPU", 0) >= n_workers
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"data": data, "settings": settings, "folder": str(folder.path.resolve()), "weights": weights},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=use_gpu),
        run_config=RunConfig(name="ray-train", storage_path=str((folder.path / "ray").resolve())),
    )
    trainer.fit()
