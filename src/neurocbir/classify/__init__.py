"""Classification from retrieved neighbours (KNN, NIR, I-NIR as scikit-learn estimators) and
the calibration of their probabilities."""

from neurocbir.classify.neighbors import KNNClassifier, NIRClassifier

__all__ = ["KNNClassifier", "NIRClassifier"]
