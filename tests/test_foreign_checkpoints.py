"""`--pretrained` with the checkpoints other tools write: timm's train.py (CheckpointSaver, .pth.tar,
argparse args, EMA), Lightning (plain and EMAWeightAveraging), DDP state dicts and DeiT-style files;
all read weights-only. Logits are compared on real HAM10000 images."""

from __future__ import annotations

import argparse
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skindistil.errors import ModelError
from skindistil.models import create_teacher, load_weights
from skindistil.models.weights import read_checkpoint

TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)
MARKER_NAME = "code-ran.txt"


@pytest.fixture(scope="module")
def real_batch(ham_root) -> torch.Tensor:
    """Six real HAM10000 images at 32 px, normalised as the models expect, (6, 3, 32, 32) float32."""
    paths = sorted((ham_root / "images").glob("*.jpg"))[:6]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32) for p in paths]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (x - 0.5) / 0.5


def _tiny(num_classes=4, seed=0):
    torch.manual_seed(seed)
    return create_teacher(num_classes=num_classes, **TINY)


def _train_steps(model, optimizer, x, steps, after_step=None):
    """A few real optimiser steps so that the raw and EMA weights differ."""
    y = torch.arange(len(x)) % model.num_classes
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if after_step is not None:
            after_step()
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _timm_train_py_checkpoint(out_dir: Path, x: torch.Tensor):
    """model_best.pth.tar exactly as timm's train.py writes it (timm.utils.CheckpointSaver with the run's
    argparse.Namespace, a ModelEmaV3 and the AMP scaler). Returns (path, raw model, EMA model)."""
    from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--mean", type=float, nargs=3, default=None)
    parser.add_argument("--model-ema", action="store_true")
    args = parser.parse_args(["--model-ema"])
    args.device, args.world_size, args.rank, args.distributed = "cpu", 1, 0, False  # set by train.py

    model = _tiny()
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    _train_steps(model, optimizer, x, 3, after_step=lambda: ema.update(model))
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, amp_scaler=NativeScaler(device="cpu"),
                            checkpoint_dir=str(out_dir), recovery_dir=str(out_dir), max_history=2)
    logging.getLogger("timm").setLevel(logging.WARNING)
    saver.save_checkpoint(epoch=0, metric=0.61)
    return out_dir / "model_best.pth.tar", model, ema.module


def test_timm_train_py_checkpoint_loads_raw_or_ema_weights(tmp_path, real_batch):
    path, raw, ema = _timm_train_py_checkpoint(tmp_path, real_batch)
    saved = read_checkpoint(path)  # what the file holds: weights-only with argparse.Namespace allowed
    assert isinstance(saved["args"], argparse.Namespace) and saved["args"].model == "vit_base_patch16_224"
    assert {"state_dict", "state_dict_ema", "optimizer", "amp_scaler", "metric"} <= set(saved)
    assert not torch.allclose(_logits(raw, real_batch), _logits(ema, real_batch), atol=1e-3)

    as_pth = tmp_path / "model_best.pth"  # the same file under the suffix users rename it to
    shutil.copy(path, as_pth)
    for source in (path, as_pth, str(path)):
        model = create_teacher(num_classes=4, pretrained=source, keep_head=True, **TINY)
        assert torch.equal(_logits(model, real_batch), _logits(raw, real_batch))

    model = _tiny(seed=9)
    report = load_weights(model, path, keep_head=True, ema=True)
    assert torch.equal(_logits(model, real_batch), _logits(ema, real_batch))
    assert report.entry == "state_dict_ema" and report.ema and "EMA weights" in str(report)
    plain = load_weights(_tiny(seed=9), path)
    assert plain.entry == "state_dict" and not plain.ema
    assert "also holds EMA weights (state_dict_ema), loaded with --ema" in str(plain)


def test_deit_style_checkpoint_model_and_model_ema(tmp_path, real_batch):
    model = _tiny(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = _tiny(seed=1)
    ema.load_state_dict(model.state_dict())
    _train_steps(model, optimizer, real_batch, 2)
    path = tmp_path / "checkpoint.pth"  # DeiT's main.py: model, optimizer, lr_scheduler, epoch, model_ema, args
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2,
                "model_ema": ema.state_dict(), "args": argparse.Namespace(model="deit_tiny", lr=0.5)}, path)
    loaded = create_teacher(num_classes=4, pretrained=str(path), keep_head=True, **TINY)
    assert torch.equal(_logits(loaded, real_batch), _logits(model, real_batch))
    loaded = create_teacher(num_classes=4, pretrained=str(path), keep_head=True, ema=True, **TINY)
    assert torch.equal(_logits(loaded, real_batch), _logits(ema, real_batch))


def test_ddp_wrapped_state_dict(tmp_path, real_batch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(_tiny(seed=2))
        path = tmp_path / "ddp.pth"
        torch.save(ddp.state_dict(), path)
    finally:
        dist.destroy_process_group()
    assert all(key.startswith("module.") for key in torch.load(path, weights_only=True))
    model = create_teacher(num_classes=4, pretrained=str(path), keep_head=True, **TINY)
    assert torch.equal(_logits(model, real_batch), _logits(ddp.module, real_batch))


def test_lightning_ema_weight_averaging_checkpoint(tmp_path, real_batch):
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    class Classifier(L.LightningModule):
        def __init__(self, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.model = _tiny(seed=3)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(real_batch, torch.arange(len(real_batch)) % 4)
    module = Classifier()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[EMAWeightAveraging(decay=0.5),
                                   ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    assert {"current_model_state", "averaging_state", "hyper_parameters", "optimizer_states"} <= set(saved)

    # After fit Lightning leaves the average in the module: --ema reproduces it, the default the raw weights.
    ema = create_teacher(num_classes=4, pretrained=str(path), keep_head=True, ema=True, **TINY)
    assert torch.equal(_logits(ema, real_batch), _logits(module.model, real_batch))
    raw = _tiny(seed=8)
    report = load_weights(raw, path, keep_head=True)
    assert report.entry == "current_model_state" and report.ema_entry == "state_dict"
    assert torch.equal(raw.pos_embed, saved["current_model_state"]["model.pos_embed"])
    assert not torch.equal(raw.pos_embed, module.model.pos_embed)


def test_ema_requested_where_there_is_none_names_the_file(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(_tiny().state_dict(), plain)
    from safetensors.torch import save_file

    safetensors = tmp_path / "w.safetensors"
    save_file(_tiny().state_dict(), str(safetensors))
    for path in (plain, safetensors):
        with pytest.raises(ModelError, match=rf"{path.name}: holds no EMA weights.*state_dict_ema"):
            create_teacher(num_classes=4, pretrained=str(path), ema=True, **TINY)
    with pytest.raises(ModelError, match="--ema loads the EMA weights of a local checkpoint"):
        create_teacher(num_classes=4, pretrained="vit_base_patch16_224.augreg_in21k", ema=True, **TINY)
    with pytest.raises(ModelError, match="--ema .*--pretrained is None"):
        create_teacher(num_classes=4, ema=True, **TINY)


def _leave_marker(path):
    Path(path).write_text("unpickling ran code from the checkpoint")


class Payload:
    """Unpickling this object would call `_leave_marker`: the shape of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-tar"])
def test_checkpoint_holding_other_objects_is_refused_without_running_code(tmp_path, zip_format):
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": _tiny().state_dict(), "hook": Payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ModelError) as caught:
        create_teacher(num_classes=4, pretrained=str(path), **TINY)
    message = str(caught.value)
    assert message.startswith(f"{path}: holds Python objects besides tensors")
    assert "test_foreign_checkpoints._leave_marker" in message and "weights_only" not in message
    assert not marker.exists()


def test_checkpoint_directory_lists_its_checkpoint_files(tmp_path, real_batch):
    _timm_train_py_checkpoint(tmp_path, real_batch)
    with pytest.raises(ModelError, match=r"none of model.safetensors.*pass one of its files: .*model_best.pth.tar"):
        create_teacher(num_classes=4, pretrained=str(tmp_path), **TINY)
