"""The command line kept its shape when it moved into the package (embedstore/cli/): every command and
every option of each, as `--help` showed them before (tests/data/cli_help_before.json, 120 columns),
save the help-text fixes listed in HELP_FIXES; and no top-level `cli` module is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BEFORE = json.loads((REPO / "tests" / "data" / "cli_help_before.json").read_text())
FEATURE_HELP = ("cls, patch_mean, clsN (final-norm CLS of the last N blocks, concatenated), cls+patch_mean or "
                "clsN+patch_mean.")
MODEL_ID_HELP = "The model (any unique prefix of its id), when the store holds several."
# (command, before, after), whitespace collapsed: the help fixes of the one-shape change (one help text per
# option declared once), and options added since.
HELP_FIXES = [
    ("ingest", "--device <str> auto, cpu, cuda, cuda:N. [default: auto]", "--device <str> auto, cpu, cuda, cuda:N. "
     "[default: auto] --preprocess-on <str> Where intensity mapping and resize run: workers (the decode processes), "
     "device (batched on the model's device; the workers only decode) or auto (device on CUDA, workers on CPU). "
     "[default: auto]"),
    ("search", "cls, patch_mean, clsN (CLS of the last N blocks), or cls/clsN+patch_mean.", FEATURE_HELP),
    ("export", "cls, patch_mean, clsN (CLS of the last N blocks), or cls/clsN+patch_mean.", FEATURE_HELP),
    ("export", "Filter on metadata columns, e.g. \"modality = 'CT'\".",
     "Filter on metadata columns, e.g. \"modality = 'CT' AND body_part = 'CHEST'\"."),
    ("index", "--level <str> slice or series.", "--level <str> slice, or series (mean of its slice vectors)."),
    ("index", "The model whose vectors measure the recall.", MODEL_ID_HELP),
    ("eval knn", " Default cls, the DINOv2 kNN protocol's input.", ""),
    ("eval fewshot", " Default cls, as for kNN.", ""),
    # issue 23 (after this shape): search says how it ran
    ("search", "--json Print JSON instead of a table.", "--json Print JSON instead of a table (with the plan that "
     "ran). --explain Say how the search ran: exactly or through the index, with how many probes, over how many of "
     "the rows the filter keeps."),
    ("migrate", "interrupted).", "interrupted); give an older format-3 store's items their kind and axis columns."),
    ("migrate", "A format-2 store directory.", "A format-2 store directory, or a format-3 one written before its items "
     "said the kind and axis of their files."),
    *((command, "The model to evaluate, when the store holds several.", MODEL_ID_HELP)
      for command in ("eval knn", "eval linear", "eval fewshot", "eval segment", "finetune")),
    # a command added since: read-only SQL over the store's tables
    ("(main)", "export Write one model's vectors with their metadata as Parquet or...",
     "export Write one model's vectors with their metadata as Parquet or... sql Query the store's tables with SQL "
     "(DuckDB, read-only): items,..."),
    # issue 24: the catalog alone, and its header reads tuned from ingest
    ("(main)", "Embed every slice under SRC into STORE; reruns embed only...",
     "Embed every slice under SRC into STORE; reruns embed only... catalog Read every header under SRC into STORE's "
     "files table,..."),
    ("ingest", "Default: up to 8 with CUDA, cores/8 on CPU.", "Default: up to 8 with CUDA, cores/8 on CPU. "
     "--header-workers <int> Processes reading headers (Ray: tasks at once); 0 reads in this process. Default: every "
     "core. --header-batch <int> Files per header-reading task. Default: 256 locally, 2048 on Ray."),
    # issue 26: region search
    ("search", "most similar to a query. Arguments", "most similar to a query. With --box, the regions most similar "
     "to a box drawn on a slice, from the stored patch tokens. Arguments"),
    ("search", "over how many of the rows the filter keeps.", "over how many of the rows the filter keeps. --box <str> "
     "Region search: X0,Y0,X1,Y1 (columns then rows, in the --key slice's or --image's own pixels); ranks regions by "
     "patch tokens. --block <int> With --box: the stored block whose patch tokens are compared (negative counts from "
     "the end). Default: the last stored. --per-slice <int> With --box: most regions from one slice. [default: 1] "
     "--score <str> With --box: window (the box's tokens against each window of that shape, in place) or late (each "
     "token's best match anywhere, averaged). [default: window] --exact With --box: score every slice, even where a "
     "region index (index --regions) would pick the candidates."),
    ("index", "measure its recall@10. Arguments", "measure its recall@10. With --regions, the region index that region "
     "search (search --box) picks candidates from. Arguments"),
    ("index", "when the store holds several. -h, --help", "when the store holds several. --regions Build the region "
     "index instead: sketches and a flat copy of the patch tokens, for search --box at archive scale. --block <int> "
     "With --regions: the stored block to index (negative counts from the end). Default: the last stored. -h, --help"),
    # issue 25: a PACS's DICOMweb service as a source
    ("ingest", "SRC... Files or directories (searched recursively).", "SRC... Files or directories (searched "
     "recursively), a PACS's DICOMweb service (dicomweb+http(s)://HOST/PATH) or a bucket (s3://BUCKET/PREFIX)."),
    ("ingest", "Default: one per GPU, else one.", "Default: one per GPU, else one. " + "--query <str> QIDO filters for DICOMweb sources, KEYWORD=VALUE&... (e.g. 'ModalitiesInStudy=CT&St udyDate=20240101-20241231'; series attributes such as Modality narrow the series). --token <str> Bearer token for DICOMweb sources (or set EMBEDSTORE_DICOMWEB_TOKEN; basic auth: EMBEDSTORE_DICOMWEB_USER and EMBEDSTORE_DICOMWEB_PASSWORD). Never stored."),
    # issue 25: stores in S3-compatible object storage
    ("ingest", "--store <path> Store directory (created if missing).",
     "--store <str> Store directory, or s3://BUCKET/PREFIX (created if missing)."),
    *((command, "STORE Store directory.", "STORE Store directory, or s3://BUCKET/PREFIX.")
      for command in ("info", "models", "failures", "search", "index", "export", "eval knn", "eval linear",
                      "eval fewshot", "eval segment", "finetune", "report", "vacuum", "check", "serve")),
]


def collapsed(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", list(BEFORE))
def test_every_command_keeps_its_options_and_their_help(command):
    words = [] if command == "(main)" else command.split()
    env = {**os.environ, "COLUMNS": "120", "TERM": "dumb", "NO_COLOR": "1"}
    shown = subprocess.run([str(Path(sys.executable).parent / "embedstore"), *words, "--help"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    expected = collapsed(BEFORE[command])
    for fixed, before, after in HELP_FIXES:
        if fixed == command:
            assert before in expected, (command, before)
            expected = expected.replace(before, after)
    assert collapsed(shown.stdout) == expected


def test_no_top_level_cli_module_is_installed(tmp_path):
    """`pip install embedstore` installs the `embedstore` package only: a `cli` of another project is safe."""
    found = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('cli'))"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert found.stdout.strip() == "None", found.stdout
    entry = subprocess.run([sys.executable, "-c", "from importlib.metadata import entry_points; "
                            "print(entry_points(group='console_scripts')['embedstore'].value)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert entry.stdout.strip() == "embedstore.cli.main:main"
