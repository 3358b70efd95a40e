"""Data layer of flower-focal: sources, synthetic generators, partitions, MONAI transforms.

This package owns everything between a run's data settings (``RunConfig.dataset``,
``data_path``, ``partitioner``, ...) and the MONAI datasets a client trains on:

* :mod:`.sources` - MedMNIST ``.npz``, image folders, CSV manifests, synthetic -> datalists;
* :mod:`.synthetic` - procedural ``synthetic-retina`` / ``synthetic-pathology`` images;
* :mod:`.partition` - ``iid`` / ``dirichlet`` / ``by-site`` institution splits;
* :mod:`.transforms` - MONAI dictionary transforms (decoding, scaling, augmentation);
* :mod:`.institution` - per-institution datasets (one tensor per split), cached per process;
* :mod:`.loader` - batches for the accelerator: tensor rows, batch augmentation, workers;
* :mod:`.prepared` - an institution's prepared tensors on its own disk, for later messages.

Clients call :func:`load_institution`; the server calls :func:`load_split` (central
evaluation), :func:`source_info` (label space) and :func:`describe_partitions` (logging).
Everything is imported on first use: a module that needs only the tensors (training, a later
message of a deployed run reading its prepared file) does not import MONAI.
"""

from __future__ import annotations

from flower_focal._compat import lazy_exports

_EXPORTS = {
    "InstitutionData": "flower_focal.data.prepared",
    "clear_caches": "flower_focal.data.institution",
    "describe_partitions": "flower_focal.data.institution",
    "load_institution": "flower_focal.data.institution",
    "load_split": "flower_focal.data.institution",
    "source_info": "flower_focal.data.institution",
    "IMAGE": "flower_focal.data.fields",
    "LABEL": "flower_focal.data.fields",
    "SITE": "flower_focal.data.fields",
    "PARTITIONERS": "flower_focal.data.partition",
    "partition_indices": "flower_focal.data.partition",
    "partition_train_val": "flower_focal.data.partition",
    "SOURCES": "flower_focal.data.sources",
    "SourceData": "flower_focal.data.sources",
    "load_csv": "flower_focal.data.sources",
    "load_folder": "flower_focal.data.sources",
    "load_medmnist": "flower_focal.data.sources",
    "load_source": "flower_focal.data.sources",
    "GENERATORS": "flower_focal.data.synthetic",
    "generate_image": "flower_focal.data.synthetic",
    "write_synthetic": "flower_focal.data.synthetic",
    "GenerateSyntheticd": "flower_focal.data.transforms",
    "build_transforms": "flower_focal.data.transforms",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
