"""Benchmarks: models and inference backends (models.py), the data loader (data.py) and training
(training.py), all timed by the one timer and memory meter of `skindistil.measure`."""
