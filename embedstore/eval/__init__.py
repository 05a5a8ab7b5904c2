"""Evaluations on stored vectors: labels and splits, kNN, linear probe, few-shot, metrics, reports."""
