"""Evaluation (STELLAR.md section 7): kNN and linear probe on the mean sparse token, reconstruction
metrics from Z, localization of objects by the concept maps, a linear segmentation probe, concept-map
pictures, the feature cache and training curves. Heavy libraries (torchmetrics, lpips,
torch-fidelity, matplotlib) are imported by the functions that use them, not here.
"""
from .concept_maps import concept_maps, render_concept_maps, save_concept_maps
from .features import FeatureCache, extract
from .knn import evaluate_knn, extract_features, knn_accuracy, knn_predict
from .linear import LinearProbe, evaluate_linear, train_linear_probe
from .localize import evaluate_localization, masked_images
from .recon import evaluate_recon, psnr, save_recon_grid, ssim
from .segment import evaluate_segmentation

__all__ = ["FeatureCache", "LinearProbe", "concept_maps", "evaluate_knn", "evaluate_linear", "evaluate_localization",
           "evaluate_recon", "evaluate_segmentation", "extract", "extract_features", "knn_accuracy", "knn_predict",
           "masked_images", "psnr", "render_concept_maps", "save_concept_maps", "save_recon_grid", "ssim",
           "train_linear_probe"]
