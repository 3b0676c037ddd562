"""Datasets (the embedded shapes set, any image folder), the multi-crop augmentation and loaders."""
from .augment import COLS, apply_crops, sample_crop_params, sample_multicrop_params
from .folder import ImageFolderDataset
from .loader import build_loader
from .shapes import ensure_shapes_dataset

__all__ = [
    "COLS",
    "ImageFolderDataset",
    "apply_crops",
    "build_loader",
    "ensure_shapes_dataset",
    "sample_crop_params",
    "sample_multicrop_params",
]
