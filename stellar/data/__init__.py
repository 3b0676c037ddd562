"""Datasets (the embedded shapes set, any image folder), STELLAR's views and the loaders.

Read in this order (each module imports only those above it):
    spec       ViewSpec: what a sample's views and masks are (built once from the config)
    order      SampleOrder: which file each rank reads in which global batch; resume state
    augment    the view math in plain PyTorch (the fused op's twin) and the crop-row sampling
    draws      each sample's random draws, from (seed, epoch, position)
    decode     bytes -> 8-bit RGB pixels, the same rules for every decoder; check: bad files
    folder     listing an image folder (and a simple dataset over it)
    multicrop  the view step: images + draws -> views (the op, or its twin)
    dali       the DALI decode pipeline of the dali backend
    loader     build_loader: the backends (reference, torchvision, dali) and their batches
"""
from .augment import COLS, apply_crops, sample_crop_params, sample_multicrop_params
from .folder import ImageFolderDataset
from .loader import build_loader
from .order import SampleOrder
from .shapes import ensure_shapes_dataset
from .spec import ViewSpec

__all__ = [
    "COLS",
    "ImageFolderDataset",
    "SampleOrder",
    "ViewSpec",
    "apply_crops",
    "build_loader",
    "ensure_shapes_dataset",
    "sample_crop_params",
    "sample_multicrop_params",
]
