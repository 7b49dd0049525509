"""Artifacts in timm's hub format: plain timm loads every kind with its weights and preprocessing, old
(format 1) artifacts still load, disagreeing hand edits are refused, and `push` uploads through
huggingface_hub (tested against a local fake and a blocked endpoint, never the network)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from conftest import REPO
from skindistil.cli import main
from skindistil.config import PreprocessConfig
from skindistil.errors import ModelError
from skindistil.models import MultiExitViT, create_teacher, extract_student, load_model, save_artifact
from skindistil.models.artifact import set_calibration, timm_crop_pct, upgrade_artifact
from skindistil.models.hub import push_model

CLASSES = ["MEL", "NV", "BCC"]
OLD = REPO / "tests" / "data" / "artifact-format1"


def _vit(depth=3, img_size=32, seed=0):
    torch.manual_seed(seed)
    model = create_teacher(num_classes=3, embed_dim=16, depth=depth, num_heads=2, img_size=img_size, patch_size=16,
                           mlp_ratio=2.0)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    return model.eval()


def _probe(size=32):
    return torch.linspace(-1, 1, 2 * 3 * size * size).reshape(2, 3, size, size)


def _timm(model_dir: Path):
    return timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()


def _depth_vit(shared_head: bool):
    model = MultiExitViT(_vit(), exits="all", shared_head=shared_head)
    for head in model.exit_heads:
        torch.nn.init.normal_(head.weight, std=1.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["teacher", "student", "depth_vit", "depth_vit_shared"])
def test_plain_timm_loads_every_kind_with_its_weights(tmp_path, kind):
    x = _probe()
    if kind == "teacher":
        model, last = _vit(), None
    elif kind == "student":
        model, _ = extract_student(_vit(depth=4), [0, 2], "first")
        model.eval()
        last = None
    else:
        model = _depth_vit(shared_head=kind == "depth_vit_shared")
        last = model  # timm gets the last exit: the MultiExitViT's own prediction
    out = save_artifact(model, tmp_path / "model", classes=CLASSES, preprocess=PreprocessConfig(image_size=32))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224" and config["num_classes"] == 3
    assert config["num_features"] == 16 and config["label_names"] == CLASSES
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    timm_model = _timm(out)
    assert timm_model.pretrained_cfg["label_names"] == CLASSES
    with torch.no_grad():
        expected = (last or model)(x)
        assert torch.equal(timm_model(x), expected)
        assert torch.equal(load_model(out).logits(x), expected)
    if kind == "depth_vit":
        assert (out / "exits.safetensors").is_file()
        with torch.no_grad():
            torch.testing.assert_close(load_model(out).model.forward_all(x), model.forward_all(x), rtol=0, atol=0)
    else:
        assert not (out / "exits.safetensors").exists()


@pytest.mark.parametrize("pre", [
    PreprocessConfig(image_size=64, border_crop=False),
    PreprocessConfig(image_size=64, border_crop=False, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225), crop_fraction=0.875),
])
def test_timm_preprocessing_is_skindistils_on_real_images(tmp_path, ham_root, pre):
    out = save_artifact(_vit(img_size=64), tmp_path / "model", classes=CLASSES, preprocess=pre)
    data_config = timm.data.resolve_data_config(model=_timm(out))
    assert data_config["input_size"] == (3, 64, 64) and data_config["crop_mode"] == "center"
    assert tuple(data_config["mean"]) == pre.mean and tuple(data_config["std"]) == pre.std
    assert data_config["interpolation"] == pre.interpolation
    assert math.floor(64 / data_config["crop_pct"]) == pre.resize_size
    transform = timm.data.create_transform(**data_config)
    paths = sorted((ham_root / "images").glob("*.jpg"))[:6]
    theirs = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    ours = load_model(out).preprocess_images(paths)
    # PIL's and torchvision's antialiased resizes round differently: at most 2 of 255 levels apart
    levels = (ours - theirs).abs() * torch.tensor(pre.std)[:, None, None] * 255
    assert levels.max() <= 2.01 and levels.mean() < 0.05


def test_crop_pct_gives_timm_the_same_resize():
    for size in range(8, 520, 7):
        for fraction in (400 / 450, 0.875, 0.9, 0.95, 1.0, 224 / 256):
            pre = PreprocessConfig(image_size=size, crop_fraction=fraction)
            pct = timm_crop_pct(pre)
            assert math.floor(size / pct) == pre.resize_size, (size, fraction)
            assert abs(pct - size / pre.resize_size) < 1e-12


def _format1_artifact(kind: str, out: Path) -> torch.nn.Module:
    """A format 1 artifact as skindistil wrote it before the hub format: the config.json, metrics and
    card kept under tests/data/artifact-format1/KIND (text), and model.safetensors written here from a
    seeded model of that architecture in the format 1 layout (one file; a MultiExitViT's ViT under "vit.").
    Returns the model, the reference for the logits."""
    from safetensors.torch import save_file

    shutil.copytree(OLD / kind, out)
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == 1 and isinstance(config["architecture"], dict)
    torch.manual_seed(1)
    model = timm.create_model(config["architecture"]["name"], **config["architecture"]["kwargs"])
    if kind == "depth_vit":
        model = MultiExitViT(model, exits=config["exits"], shared_head=config["shared_head"])
    for parameter in model.parameters():  # not timm's init: zero biases would hide a misplaced tensor
        torch.nn.init.normal_(parameter, std=0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    return model.eval()


@pytest.mark.parametrize("kind", ["vit", "depth_vit"])
def test_format_1_artifacts_still_load_and_upgrade(tmp_path, kind):
    copy = tmp_path / kind
    model = _format1_artifact(kind, copy)
    loaded = load_model(copy)
    assert loaded.config["format"] == 1 and loaded.architecture["kwargs"]["depth"] == 2
    with torch.no_grad():
        if kind == "vit":
            logits = loaded.logits(_probe())
            torch.testing.assert_close(logits, model(_probe()), rtol=0, atol=1e-6)
        else:
            logits = loaded.model.forward_all(_probe())
            torch.testing.assert_close(logits, model.forward_all(_probe()), rtol=0, atol=1e-6)
            assert not torch.allclose(logits[0], logits[-1])  # the exits differ: each read its own head
    set_calibration(copy, 1.5, "val")
    with pytest.raises(ModelError, match="predates timm's hub format.*upgrade_artifact"):
        push_model(copy, "me/old", dry_run=True)
    upgrade_artifact(copy)
    upgraded = load_model(copy)
    assert upgraded.config["format"] == 2 and upgraded.temperature == 1.5
    assert upgraded.metrics == loaded.metrics and upgraded.config["provenance"] == loaded.config["provenance"]
    with torch.no_grad():
        assert torch.equal(_timm(copy)(_probe()), loaded.logits(_probe()))
        if kind == "depth_vit":
            assert torch.equal(upgraded.model.forward_all(_probe()), logits)


def test_disagreeing_timm_and_skindistil_fields_are_refused(tmp_path):
    out = save_artifact(_vit(), tmp_path / "model", classes=CLASSES, preprocess=PreprocessConfig(image_size=32))
    original = (out / "config.json").read_text()
    edits = {
        "label_names": lambda c: c.update(label_names=["MEL", "BCC", "NV"]),
        "pretrained_cfg.mean": lambda c: c["pretrained_cfg"].update(mean=[0.4, 0.5, 0.5]),
        "pretrained_cfg.input_size": lambda c: c["pretrained_cfg"].update(input_size=[3, 48, 48]),
        "pretrained_cfg.interpolation": lambda c: c["pretrained_cfg"].update(interpolation="bicubic"),
    }
    for field, edit in edits.items():
        config = json.loads(original)
        edit(config)
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelError, match=rf"config\.json: {field} is .* the two must agree"):
            load_model(out)
    config = json.loads(original)
    config["format"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="unsupported artifact format 3"):
        load_model(out)
    config["format"], config["architecture"] = 2, {"bad": 1}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="architecture: expected a timm model name"):
        load_model(out)


class FakeHub:
    """Records what huggingface_hub's HfApi would be asked to do, and copies the uploaded files."""

    def __init__(self, root: Path, refuse: Exception | None = None):
        self.root, self.refuse, self.calls = root, refuse, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.refuse is not None:
            raise self.refuse

    def upload_folder(self, *, folder_path, repo_id, allow_patterns, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        target = self.root / repo_id
        target.mkdir(parents=True)
        for name in allow_patterns:
            shutil.copy(Path(folder_path) / name, target / name)
        return type("CommitInfo", (), {"commit_url": f"https://hub.test/{repo_id}/commit/1"})()


def test_push_uploads_a_folder_timm_reads(tmp_path):
    out = save_artifact(_depth_vit(shared_head=False), tmp_path / "run" / "model", classes=CLASSES,
                        preprocess=PreprocessConfig(image_size=32), metrics={"test": {"balanced_accuracy": 0.5}})
    (out / "stray.tmp").write_text("not uploaded")
    hub = FakeHub(tmp_path / "hub")
    result = push_model(tmp_path / "run", "me/lesions", private=True, api=hub)
    assert result["url"] == "https://hub.test/me/lesions/commit/1"
    assert hub.calls[0] == ("create_repo", "me/lesions", {"exist_ok": True, "private": True, "repo_type": "model"})
    uploaded = tmp_path / "hub" / "me" / "lesions"
    assert sorted(p.name for p in uploaded.iterdir()) == [
        "README.md", "config.json", "exits.safetensors", "metrics.json", "model.safetensors", "model_card.md"]
    readme = (uploaded / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: timm\npipeline_tag: image-classification\n")
    assert 'timm.create_model("hf-hub:me/lesions", pretrained=True)' in readme and "black-border crop" in readme
    assert "| test.balanced_accuracy | 0.5000 |" in readme and "exits.safetensors" in readme
    with torch.no_grad():  # what landed on the "hub" is a folder timm loads as it is
        assert torch.equal(_timm(uploaded)(_probe()), load_model(out).logits(_probe()))


def test_push_offline_fails_fast_and_leaves_the_folder_ready(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    out = save_artifact(_vit(), tmp_path / "model", classes=CLASSES, preprocess=PreprocessConfig(image_size=32))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    assert main(["push", "--model", str(out), "--repo", "me/lesions"]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and f"{out} is ready to upload" in err
    assert time.perf_counter() - started < 10
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: timm")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ModelError, match=r"http://127\.0\.0\.1:9 is unreachable\).*is ready to upload"):
        push_model(out, "me/lesions")
    with pytest.raises(ModelError, match="the hub refused the upload to me/lesions.*LocalTokenNotFoundError.*hf auth login.*ready to upload"):
        push_model(out, "me/lesions", api=FakeHub(tmp_path / "hub", refuse=_http_error()))
    with pytest.raises(ModelError, match="expected a hub repository id OWNER/NAME"):
        push_model(out, "lesions")

    assert main(["push", "--model", str(out), "--repo", "me/lesions", "--dry-run"]) == 0
    assert "nothing uploaded" in capsys.readouterr().out


def _http_error() -> Exception:
    from huggingface_hub.errors import LocalTokenNotFoundError

    return LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")

