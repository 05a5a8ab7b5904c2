"""Sources: find files (discover.py), read DICOM (dicom.py, dicom_pixels.py) / NIfTI / raster
headers and pixels, the catalog of read tasks (catalog.py), series grouping and ordering (series.py),
a task's slices in native units (native.py), and the records they pass on (records.py). Import from
the modules: this package file stays empty, so that what needs one small module (the size limits,
the records) does not load every reader and pydicom."""
