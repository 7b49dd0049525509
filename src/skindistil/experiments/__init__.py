"""Experiments: the main job (pipeline: prepare -> teacher -> distill -> evaluate -> benchmark -> report),
its run report, and the loss ablation. Above training, evaluation and inference; below the commands."""
