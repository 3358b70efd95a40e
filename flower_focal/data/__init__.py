"""Data layer of flower-focal: sources, synthetic generators, partitions, MONAI transforms.

This package owns everything between a run's data settings (``RunConfig.dataset``,
``data_path``, ``partitioner``, ...) and the MONAI datasets a client trains on:

* :mod:`.sources` - MedMNIST ``.npz``, image folders, CSV manifests, synthetic -> datalists;
* :mod:`.synthetic` - procedural ``synthetic-retina`` / ``synthetic-pathology`` images;
* :mod:`.partition` - ``iid`` / ``dirichlet`` / ``by-site`` institution splits;
* :mod:`.transforms` - MONAI dictionary transforms (decoding, scaling, augmentation);
* :mod:`.institution` - per-institution datasets (one tensor per split), cached per process;
* :mod:`.loader` - batches for the accelerator: tensor rows, batch augmentation, workers.

Clients call :func:`load_institution`; the server calls :func:`load_split` (central
evaluation), :func:`source_info` (label space) and :func:`describe_partitions` (logging).
"""

from __future__ import annotations

from flower_focal.data.institution import (
    InstitutionData,
    clear_caches,
    describe_partitions,
    load_institution,
    load_split,
    source_info,
)
from flower_focal.data.fields import IMAGE, LABEL, SITE
from flower_focal.data.partition import PARTITIONERS, partition_indices, partition_train_val
from flower_focal.data.sources import (
    SOURCES,
    SourceData,
    load_csv,
    load_folder,
    load_medmnist,
    load_source,
)
from flower_focal.data.synthetic import GENERATORS, generate_image, write_synthetic
from flower_focal.data.transforms import GenerateSyntheticd, build_transforms

__all__ = [
    "GENERATORS",
    "IMAGE",
    "LABEL",
    "PARTITIONERS",
    "SITE",
    "SOURCES",
    "GenerateSyntheticd",
    "InstitutionData",
    "SourceData",
    "build_transforms",
    "clear_caches",
    "describe_partitions",
    "generate_image",
    "load_csv",
    "load_folder",
    "load_institution",
    "load_medmnist",
    "load_source",
    "load_split",
    "partition_indices",
    "partition_train_val",
    "source_info",
    "write_synthetic",
]
