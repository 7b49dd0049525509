"""LightningModule for distillation: it runs the student (and the teacher), and calls the method of
`skindistil.distill.methods.REGISTRY` (distilvit, fcvit, fcvit-probs, full) for the loss.

Every label term of every method uses one `TaskLoss`: the class weights of `data.imbalance` and
`optim.label_smoothing`, as the teacher's training does. Logged: train/loss_step and train/<part> for
each part the method returns (task, kd, mse, cos, dist, per_depth_ce, chain_kl, enabled_depths).

The teacher is any timm classifier, frozen, kept in eval mode for the whole run, and left out of
checkpoints. It sees each training batch through its own preprocessing (`teacher_preprocess`: input
size, mean, std; `data.transforms.reprocess` of the student's augmented view); its hidden states are
computed only when the cosine term needs them.
With a `teacher_store` (`training.teacher_store.TeacherStore`) the teacher's outputs are read from
the store by the batch's sample keys (batches (images, labels, keys)) instead of running the teacher.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from skindistil.config import LossConfig, OptimConfig, PreprocessConfig
from skindistil.data.transforms import reprocess
from skindistil.distill.losses import TaskLoss
from skindistil.distill.methods import TeacherOutputs, get_method, student_outputs, token_methods
from skindistil.models.distilled import is_distilled, without_distillation_token
from skindistil.models.multi_exit import vit_logits_and_hidden
from skindistil.training.collect import PredictionCollector
from skindistil.training.optim import configure_optimizers
from skindistil.training.trainer import CLASSES_KEY
from skindistil.training.validation import log_validation_metrics


class DistillerModule(L.LightningModule):
    """`student` is a timm ViT (distilvit) or a MultiExitViT with exits (fcvit, fcvit-probs, full)."""

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        method: str,
        class_names: list[str],
        optim: OptimConfig,
        loss: LossConfig,
        class_weights: torch.Tensor | None = None,
        teacher_preprocess: PreprocessConfig | None = None,
        student_preprocess: PreprocessConfig | None = None,
        teacher_store=None,
    ):
        super().__init__()
        spec = get_method(method)
        if loss.distillation_token != "none":
            if not spec.teacher:
                raise ValueError(f"method {method!r} has no teacher term for the distillation token "
                                 f"(it works with {', '.join(token_methods())})")
            if not is_distilled(student):
                raise ValueError("loss.distillation_token needs a student with a distillation token "
                                 "(models.distilled.add_distillation_token)")
        self.teacher_store = teacher_store
        # Lightning keeps each module's train/eval mode as it finds it, and students are built from
        # loaded (eval-mode) artifacts: without this, dropout and drop-path would be off while training
        self.student = student.train()
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.method = method
        self.class_names = list(class_names)
        self.optim_cfg = optim
        self.loss_cfg = loss
        self.register_buffer("class_weights", class_weights, persistent=False)
        TaskLoss(label_smoothing=optim.label_smoothing)  # refuses a bad value before training starts
        self.teacher_preprocess, self.student_preprocess = teacher_preprocess, student_preprocess
        self.val_predictions = PredictionCollector()

    # the teacher never leaves eval mode, whatever Lightning does with the student
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    @torch.no_grad()
    def _teacher(self, images, hidden: bool, keys) -> TeacherOutputs:
        """Teacher logits, and (with `hidden`) its last hidden states without a distillation token: from
        the teacher store by sample `keys` when there is one, else from the teacher."""
        if self.teacher_store is not None:
            if keys is None:
                raise ValueError("a teacher store needs training batches with sample keys (SkinDataModule(train_keys=True))")
            logits, tokens = self.teacher_store.outputs(keys, device=images.device)
            return TeacherOutputs(logits, tokens if hidden else None)
        if self.teacher_preprocess is not None and self.student_preprocess is not None:
            images = reprocess(images, self.student_preprocess, self.teacher_preprocess)
        if not hidden:
            return TeacherOutputs(self.teacher(images))
        logits, tokens = vit_logits_and_hidden(self.teacher, images)
        return TeacherOutputs(logits, without_distillation_token(self.teacher, tokens))

    def training_step(self, batch, batch_idx):
        loss, parts = self.training_loss(batch)
        batch_size = len(batch[1])
        # the epoch mean is EpochMeanLoss's (it survives a mid-epoch resume)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, on_step=True, batch_size=batch_size)
        return loss

    def training_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached parts) of the method on a training batch (images, labels[, sample keys])."""
        images, targets = batch[0], batch[1]
        keys = batch[2] if len(batch) > 2 else None
        spec, cfg = get_method(self.method), self.loss_cfg
        hidden = spec.teacher and bool(cfg.a_cos)
        student = student_outputs(self.student, images, token=cfg.distillation_token != "none", hidden=hidden)
        teacher = self._teacher(images, hidden, keys) if spec.teacher else None
        task = TaskLoss(self.class_weights, self.optim_cfg.label_smoothing)
        return spec.loss(student, teacher, targets, cfg, task, int(self.global_step))

    def validation_step(self, batch, batch_idx):
        images, targets, indices = batch
        logits = self.student(images).float()
        self.log("val/loss", F.cross_entropy(logits, targets), on_epoch=True, sync_dist=True, batch_size=len(targets))
        self.val_predictions.update(logits.softmax(dim=-1), targets, indices)

    def on_validation_epoch_end(self):
        log_validation_metrics(self, self.val_predictions, self.class_names)

    def on_save_checkpoint(self, checkpoint):
        # the frozen teacher is an input of the run, not part of its state
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint[CLASSES_KEY] = list(self.class_names)  # a resume on other classes is refused

    def on_load_checkpoint(self, checkpoint):
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

    def configure_optimizers(self):
        return configure_optimizers(self, self.student, self.optim_cfg)
