"""Evaluation of frozen backbones: linear probe, k-NN."""
