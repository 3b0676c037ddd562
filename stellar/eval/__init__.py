"""Evaluation: kNN and linear probe on the mean sparse token, concept-map pictures."""
from .concept_maps import concept_maps, render_concept_maps, save_concept_maps
from .knn import evaluate_knn, extract_features, knn_accuracy, knn_predict
from .linear import LinearProbe, evaluate_linear, train_linear_probe

__all__ = ["LinearProbe", "concept_maps", "evaluate_knn", "evaluate_linear", "extract_features",
           "knn_accuracy", "knn_predict", "render_concept_maps", "save_concept_maps", "train_linear_probe"]
