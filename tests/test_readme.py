"""Every command in the README runs as written: on the demo store that `embedstore demo` makes (its
labels and masks beside it), in a scratch folder, one after the other in the README's order. Only the
commands in SKIPPED do not run, each for a network, a GPU, or because it is what runs this test.

What is substituted: the README's placeholders (PLACEHOLDERS: /data/store, labels.csv, <a slice
key>, ...) by the demo's files, and a free port for `serve`, which runs until it answers its page
and is then stopped."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs every command the README shows

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMAND_TIMEOUT_S = 900
SERVE_WAIT_S = 60

SKIPPED = {
    'pip install -e ".[dev]"': "the install this test runs in",
    "python -m pytest -q": "the suite this test is part of",
    'python -m pytest -q -m "not slow"': "the fast lane of the suite this test is part of",
    "embedstore ingest /data/archive --store /data/store --model dinov2_vits14 --model dinov2_vitb14":
        "network: pretrained weights from the hub (the default --weights hub)",
    "embedstore ingest /data/archive --store /data/store --executor ray": "network: the default --weights hub",
    "embedstore ingest /data/archive --store /data/store --ray-address auto": "network: a running Ray cluster",
    "embedstore finetune /data/store --labels labels.csv --mode full --workers 4": "a GPU: four of them",
    "curl -LO https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth": "network: a download",
    "embedstore ingest /data/archive --store /data/store --model dinov2_vitb14 --weights dinov2_vitb14_pretrain.pth":
        "network: the checkpoint the curl line downloads",
    'embedstore ingest dicomweb+https://pacs.example.org/dicom-web --store /data/store --query '
    '"ModalitiesInStudy=CT&StudyDate=20240101-20241231"': "network: a PACS (tests/test_dicomweb.py runs one)",
    "embedstore ingest s3://bucket/archive/ --store /data/store": "network: a bucket (tests/test_object_sources.py "
                                                                  "runs an S3 server)",
    "EMBEDSTORE_PATIENT_ID_KEY=... embedstore ingest /data/archive --store s3://bucket/stores/chest-ct":
        "network: a bucket (tests/test_object_store.py runs an S3 server)",
}
DEMO = "embedstore demo --store embedstore-demo"


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks, their trailing comments left off."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def placeholders(work: Path) -> dict[str, str]:
    """The README's placeholders and what stands for them on the demo store."""
    from embedstore.store import Store

    demo = work / "embedstore-demo"
    store = Store.open(demo / "store")
    key = store.rows("items", "modality = 'CT' AND key LIKE 'dicom:%'", ["key"])["key"][0].as_py()
    return {"/data/archive": str(demo / "archive"), "/data/store": str(demo / "store"),
            "labels.csv": str(demo / "labels.csv"), "masks.csv": str(demo / "masks.csv"),
            "query.dcm": str(demo / "archive" / "pydicom" / "CT_small.dcm"), "<a slice key>": key,
            "<model_id>": store.resolve_model_id(None)}


def substituted(command: str, replacements: dict[str, str]) -> str:
    """Each placeholder replaced once: a <name> wherever it is, a file or folder name where it stands
    as a word of its own (labels.csv, not demo/labels.csv)."""
    pattern = "|".join(re.escape(name) if name.startswith("<") else rf"(?<![\w/.-]){re.escape(name)}(?![\w.])"
                       for name in sorted(replacements, key=len, reverse=True))
    return re.sub(pattern, lambda match: replacements[match.group(0)], command)


def run(command: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)


def serve_until_it_answers(command: str, work: Path, env: dict) -> None:
    port = free_port()
    command = re.sub(r"--port \d+", f"--port {port}", command) if "--port" in command else f"{command} --port {port}"
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SERVE_WAIT_S
        while time.monotonic() < deadline:
            assert server.poll() is None, server.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    assert page.status == 200 and b"embedstore" in page.read()
                    return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"{command} did not answer within {SERVE_WAIT_S} s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_skipped_commands_are_in_the_readme():
    """The list of commands not run stays true: each is still one of the README's."""
    commands = readme_commands()
    assert not set(SKIPPED) - set(commands) and DEMO in commands


def test_every_readme_command_runs_as_written(tmp_path):
    work = tmp_path / "work"
    (work / "benchmarks").mkdir(parents=True)
    shutil.copytree(REPO / "benchmarks" / "suites", work / "benchmarks" / "suites",
                    ignore=shutil.ignore_patterns("demo-data"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-cache"), "COLUMNS": "200"}
    demo = run(DEMO, work, env)  # first: every other command runs on what it makes
    assert demo.returncode == 0, demo.stderr[-3000:]
    replacements = placeholders(work)
    ran = []
    for command in readme_commands():
        if command in SKIPPED or command == DEMO:
            continue
        command = substituted(command, replacements)
        if command.startswith("embedstore serve "):
            serve_until_it_answers(command, work, env)
        else:
            result = run(command, work, env)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) == len(readme_commands()) - len(SKIPPED) - 1  # every command but the skipped and the demo
    assert (work / "demo-bench" / "leaderboard.md").is_file() and (work / "demo-report" / "report.html").is_file()
    assert (work / "lora.json").is_file() and (work / "seg-report" / "report.md").is_file()
