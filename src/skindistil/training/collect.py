"""Gather predictions over the whole evaluation set, across processes, exactly once per sample."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class PredictionCollector(Metric):
    """Collects (probabilities, target, sample index) and returns them de-duplicated by index.

    Under DDP every process sees a shard; torchmetrics concatenates the shards at compute(). Samplers
    that pad shards to equal length repeat a few samples: keeping one row per index makes the
    metrics cover the validation set exactly, not a padded or partial view of it.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> None:
        self.probs.append(probs.detach().float())
        self.targets.append(targets.detach().long())
        self.indices.append(indices.detach().long())

    def compute(self) -> dict[str, np.ndarray]:
        # lists of per-batch tensors in one process; one concatenated tensor after a DDP sync
        if isinstance(self.indices, list) and not self.indices:
            return {"probs": np.zeros((0, 0), np.float32), "targets": np.zeros(0, np.int64), "indices": np.zeros(0, np.int64)}
        probs = dim_zero_cat(self.probs).cpu().numpy()
        targets = dim_zero_cat(self.targets).cpu().numpy()
        indices = dim_zero_cat(self.indices).cpu().numpy()
        indices, first = np.unique(indices, return_index=True)
        return {"probs": probs[first], "targets": targets[first], "indices": indices}
