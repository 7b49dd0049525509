"""LightningModule for distillation: SkinDistilViT, FCViT, FCViTProbs and their combination.

Training loss per method (z_d: logits of the exit at depth d, N = the deepest; CE uses the class
weights of `data.imbalance`; the KD loss is `DistillationLoss`: task + KD + logit MSE + hidden cosine):

- distilvit: the KD loss of the student (a timm ViT with fewer blocks) against the teacher.
- fcvit: sum over depths d of CE(z_d, label); no teacher term.
- fcvit-probs (one shared head): CE(z_N, label) + a_chain * sum over the enabled depths j of
  KL(softmax(z_{j+1}) detached || softmax(z_j)); depths are enabled top-down on integer optimiser
  steps (`enabled_depths`: chain_warmup_steps, then one more every chain_every_steps).
- full (the paper's open question, combining the three): a teacher-initialised DepthViT with a head
  per depth, trained with the KD loss against the teacher at the last exit (z_N, last hidden state),
  + sum over d < N of CE(z_d, label) + a_chain * the chained per-depth KL with the same schedule.
  (The cascade is a chain of distilvit runs, see `distill_run`.)

With the DeiT distillation token (loss.distillation_token soft | hard; the student is a distilled
ViT, `models.distilled`), the KD loss reads the class-token head and adds a_dist * the token term on
the distillation head (in `full`: at the last exit; the other exits are trained on the mean of their
two heads, the logits they predict with). Without it, a distilled student is trained on its output.

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
from skindistil.distill.losses import DistillationLoss, chained_depth_kl, enabled_depths, per_depth_ce
from skindistil.models.depth import vit_logits_and_hidden, vit_stem
from skindistil.models.distilled import head_logits, is_distilled, without_distillation_token
from skindistil.training.collect import PredictionCollector
from skindistil.training.optim import configure_optimizers
from skindistil.training.trainer import CLASSES_KEY
from skindistil.training.validation import log_validation_metrics

METHODS = ("distilvit", "fcvit", "fcvit-probs", "full")
TOKEN_METHODS = ("distilvit", "full")  # the methods with a teacher term the distillation token can carry


class DistillerModule(L.LightningModule):
    """`student` is a timm ViT (distilvit) or a DepthViT with exits (fcvit, fcvit-probs, full)."""

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
        if method not in METHODS:
            raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
        if loss.distillation_token != "none":
            if method not in TOKEN_METHODS:
                raise ValueError(f"method {method!r} has no teacher term for the distillation token "
                                 f"(it works with {', '.join(TOKEN_METHODS)})")
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
        self.kd_loss = DistillationLoss(
            a_task=loss.a_task, a_kd=loss.a_kd, temperature=loss.temperature, a_mse=loss.a_mse,
            a_cos=loss.a_cos, cos_tokens=loss.cos_tokens, class_weights=class_weights,
            distillation_token=loss.distillation_token, a_dist=loss.a_dist,
        )
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
    def _teacher(self, images, hidden: bool, keys):
        """Teacher logits, and (with `hidden`) its last hidden states without a distillation token: from
        the teacher store by sample `keys` when there is one, else from the teacher."""
        if self.teacher_store is not None:
            if keys is None:
                raise ValueError("a teacher store needs training batches with sample keys (SkinDataModule(train_keys=True))")
            logits, tokens = self.teacher_store.outputs(keys, device=images.device)
            return logits, (tokens if hidden else None)
        if self.teacher_preprocess is not None and self.student_preprocess is not None:
            images = reprocess(images, self.student_preprocess, self.teacher_preprocess)
        if not hidden:
            return self.teacher(images), None
        logits, tokens = vit_logits_and_hidden(self.teacher, images)
        return logits, without_distillation_token(self.teacher, tokens)

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
        if self.method == "distilvit":
            loss, parts = self._kd_step(images, targets, keys)
        elif self.method == "fcvit":
            all_logits = self.student.forward_all(images)
            loss = per_depth_ce(all_logits, targets, weight=self.class_weights)
            parts = {"per_depth_ce": loss.detach()}
        else:  # fcvit-probs and full: chained KL over the enabled depths
            all_logits, hidden = self.student.forward_all(images, return_hidden=True)
            depths = enabled_depths(
                int(self.global_step), all_logits.shape[0], self.loss_cfg.chain_warmup_steps,
                self.loss_cfg.chain_every_steps,
            )
            chain = chained_depth_kl(all_logits, depths)
            if self.method == "fcvit-probs":
                task = F.cross_entropy(all_logits[-1], targets, weight=self.class_weights)
                parts = {"task": task.detach()}
            else:
                logits, dist_logits = all_logits[-1], None
                if self.loss_cfg.distillation_token != "none":
                    logits, dist_logits = self.student.exit_head_logits(all_logits.shape[0] - 1, hidden)
                task, parts = self._kd_parts(logits, dist_logits, hidden, images, targets, keys)
                task = task + per_depth_ce(all_logits[:-1], targets, weight=self.class_weights)
            loss = task + self.loss_cfg.a_chain * chain
            parts = {**parts, "chain_kl": chain.detach(), "enabled_depths": float(len(depths))}
        return loss, parts

    def _kd_step(self, images, targets, keys):
        hidden = self.student.blocks(vit_stem(self.student, images))
        logits, dist_logits = head_logits(self.student, hidden)
        if dist_logits is not None and self.loss_cfg.distillation_token == "none":
            logits, dist_logits = (logits + dist_logits) / 2, None  # trained on its output, as it predicts
        return self._kd_parts(logits, dist_logits, hidden, images, targets, keys)

    def _kd_parts(self, student_logits, dist_logits, student_hidden, images, targets, keys):
        need_hidden = bool(self.loss_cfg.a_cos)
        teacher_logits, teacher_hidden = self._teacher(images, need_hidden, keys)
        hidden_pairs = None
        if need_hidden:
            vit = getattr(self.student, "vit", self.student)
            hidden_pairs = [(without_distillation_token(vit, student_hidden), teacher_hidden)]
        return self.kd_loss(student_logits, teacher_logits, targets, hidden_pairs=hidden_pairs,
                            dist_logits=dist_logits)

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
