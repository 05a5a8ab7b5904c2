"""benchmarks/gpu_check.py runs end to end on the CPU in its --smoke form (CI-sized): the same code
a lent GPU runs, so the script that reports where a GPU's milliseconds go cannot rot unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_its_smoke_form_and_reports_every_stage():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    measured = [row for row in result["model_only"] if "skipped" not in row]
    assert {row["precision"] for row in measured} == {"fp32", "bf16", "fp16"}
    assert all(row["images_per_s"] > 0 and row["cosine_to_eager_fp32"] >= 0.999 for row in measured)
    pipeline = result["pipeline"]
    assert pipeline["preprocess_on_device"] and pipeline["slices"] == 24 and pipeline["slices_per_s"] > 0
    assert set(pipeline["stages_ms_per_slice"]) == {"wait_decode_ms_per_slice", "h2d_and_map_ms_per_slice",
                                                   "forward_and_d2h_ms_per_slice", "host_decode_cpu_ms_per_slice"}
    assert pipeline["overlapped"]["slices"] == 24 and pipeline["overlapped"]["slices_per_s"] > 0  # each slice once
    assert {"read_decode", "preprocess", "embed", "write_patches", "commit"} <= set(
        pipeline["with_store"]["stage_ms_per_slice"])
    assert pipeline["cpu_vs_device_patch_mean_cosine"] >= 0.999
    assert result["finetune"]["finetune_images_per_s"] > 0
