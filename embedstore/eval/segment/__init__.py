"""Segmentation probes on stored patch tokens (`embedstore eval segment`), without the backbone.

masks.py reads label images, NIfTI label volumes and DICOM SEG; data.py joins them to stored slices
and splits by patient; tokens.py streams the tokens from Zarr; decoders.py holds the study's linear
and UNet heads; train.py trains seven learning rates at once; protocol.py chooses, refits and
tests; metrics.py scores with MONAI and torchmetrics; predictions.py and report.py write results.
"""
