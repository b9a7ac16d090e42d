"""The majority vote now lives in dkmeans.metrics; these names stay importable from here."""

from .metrics import accuracy, centroid_labels, predict_labels

__all__ = ["accuracy", "centroid_labels", "predict_labels"]
