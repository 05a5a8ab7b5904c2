"""Intensity settings: how native pixel values (HU for CT) are mapped to the model's [0, 1] input.

Plain settings, no pixel work: the model spec records them and every reader rebuilds the same mapping
from it (embedstore/preprocess.py does the work). Importing this module costs nothing, so opening a
store never loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedstore.errors import UsageError

# Bump when any step of embedstore/preprocess.py changes its output: it is part of every model_id.
PREPROCESS_VERSION = 2

# CT windows as (low, high) in HU. "study" is the reference study's default clamp.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "study": (-1024.0, 600.0),
    "brain": (0.0, 80.0),  # L40 W80
    "subdural": (-32.5, 182.5),  # L75 W215
    "stroke": (20.0, 60.0),  # L40 W40
    "lung": (-1350.0, 150.0),  # L-600 W1500
    "mediastinum": (-125.0, 225.0),  # L50 W350
    "abdomen": (-150.0, 250.0),  # L50 W400
    "liver": (-45.0, 105.0),  # L30 W150
    "bone": (-500.0, 1300.0),  # L400 W1800
}
# `--window multi`: three windows as the three input channels, chosen by BodyPartExamined.
MULTI_WINDOWS: dict[str, tuple[str, str, str]] = {
    "head": ("brain", "subdural", "bone"),
    "chest": ("lung", "mediastinum", "bone"),
    "abdomen": ("abdomen", "liver", "bone"),
}
BODY_PART_REGIONS = {
    "HEAD": "head", "BRAIN": "head", "SKULL": "head", "HEADNECK": "head",
    "CHEST": "chest", "THORAX": "chest", "LUNG": "chest", "HEART": "chest", "CHESTABDOMEN": "chest",
    "ABDOMEN": "abdomen", "PELVIS": "abdomen", "LIVER": "abdomen", "ABDOMENPELVIS": "abdomen",
    "KIDNEY": "abdomen", "PANCREAS": "abdomen",
}
DEFAULT_MULTI_REGION = "chest"  # CT without (or with an unknown) body part: lung / mediastinum / bone
# Projection radiography: its display is defined by the file's VOI window or LUT.
XRAY_MODALITIES = {"CR", "DX", "MG", "RF", "XA", "PX", "IO", "RG"}
WINDOW_MODES = ("auto", "header", "multi")


@dataclass(frozen=True)
class IntensityConfig:
    # auto: the study's CT window, MR percentiles, X-ray VOI; header: the file's own VOI window
    # wherever it has one; a CT_WINDOWS name; multi or multi:W1,W2,W3: three CT windows as channels.
    window: str = "auto"
    mr_percentiles: tuple[float, float] = (5.0, 95.0)

    def __post_init__(self):
        if self.window not in WINDOW_MODES and self.window not in CT_WINDOWS:
            if not self.window.startswith("multi:"):
                raise UsageError(f"unknown window {self.window!r}: use auto, header, multi, multi:W1,W2,W3 "
                                 f"or one of {', '.join(CT_WINDOWS)}")
            names = self.window.removeprefix("multi:").split(",")
            if len(names) != 3 or any(name not in CT_WINDOWS for name in names):
                raise UsageError(f"--window {self.window}: multi: takes three of {', '.join(CT_WINDOWS)}")
        low, high = self.mr_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise UsageError(f"MR percentiles must satisfy 0 <= low < high <= 100, not {low}, {high}")

    @property
    def is_multi(self) -> bool:
        return self.window == "multi" or self.window.startswith("multi:")

    @property
    def channels(self) -> int:
        return 3 if self.is_multi else 1

    @property
    def ct_window(self) -> tuple[float, float]:
        """The single CT window (every mode but a named preset uses the study's)."""
        return CT_WINDOWS[self.window if self.window in CT_WINDOWS else "study"]

    def multi_windows(self, body_part: str | None) -> tuple[str, ...]:
        if self.window.startswith("multi:"):
            return tuple(self.window.removeprefix("multi:").split(","))
        region = BODY_PART_REGIONS.get((body_part or "").upper().replace(" ", ""), DEFAULT_MULTI_REGION)
        return MULTI_WINDOWS[region]

    def uses_header_voi(self, modality: str | None) -> bool:
        return self.window == "header" or modality in XRAY_MODALITIES
