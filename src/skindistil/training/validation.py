"""Validation metrics logged at the end of each validation epoch, shared by every LightningModule."""

from __future__ import annotations

import warnings

import lightning as L

from skindistil.evaluation.metrics import accuracy, balanced_accuracy, decide
from skindistil.training.collect import PredictionCollector


def log_validation_metrics(module: L.LightningModule, collector: PredictionCollector, class_names, prefix="val") -> dict:
    """Compute BMA/accuracy over everything `collector` gathered (all processes), log and reset."""
    gathered = collector.compute()
    collector.reset()
    if module.trainer.sanity_checking or len(gathered["targets"]) == 0:
        return {}
    with warnings.catch_warnings():
        # a small validation set may lack a class: BMA is then over the classes present (warned once in evaluate)
        warnings.simplefilter("ignore")
        preds = decide(gathered["probs"])
        values = {
            f"{prefix}/balanced_accuracy": balanced_accuracy(gathered["targets"], preds, len(class_names)),
            f"{prefix}/acc": accuracy(gathered["targets"], preds),
        }
    values[f"{prefix}/num_samples"] = float(len(gathered["targets"]))
    # every process holds the same gathered values, so no further reduction is needed
    module.log_dict(values, prog_bar=True, sync_dist=False)
    return values
