"""The data and store of benchmarks/suites/demo.toml, offline: generated stripes tasks and segmentation
phantoms (56 px PNG) ingested with two random-weight ViTs (dinov2_vits14, seed 0, and dinov2_vits14_reg,
seed 1: the same seed would give both the same patch embedding). A rerun embeds nothing new.

    python benchmarks/suites/make_demo.py [--root benchmarks/suites/demo-data]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # embedstore from this checkout

from embedstore import samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent / "demo-data")
    args = parser.parse_args()
    sources = samples.write_suite_data(args.root) if not (args.root / "phantoms").exists() else \
        [args.root / "orientation" / "images", args.root / "brightness" / "images", args.root / "phantoms" / "images"]
    embedstore = Path(sys.executable).parent / "embedstore"
    for model, seed in (("dinov2_vits14", 0), ("dinov2_vits14_reg", 1)):
        subprocess.run([str(embedstore), "ingest", *map(str, sources), "--store", str(args.root / "store"), "--model",
                        model, "--seed", str(seed), "--weights", "random", "--image-size", "56"], check=True)


if __name__ == "__main__":
    main()
