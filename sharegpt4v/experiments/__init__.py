"""Experiments built from the stages: the paper's ablation in miniature."""
