"""Evaluation of a trained run on its test fold: kappa, AUROC, calibration, retrieval mAP and
precision at k, latent-structure metrics, the KNN-overfit experiment, tables and plots."""
