"""create_teacher: timm construction, argument errors, hub tags and the offline message."""

from __future__ import annotations

import pytest
import torch

from skindistil.errors import ModelError
from skindistil.models import create_teacher
from skindistil.models.teacher import DEFAULT_TEACHER

TINY = dict(embed_dim=32, depth=4, num_heads=2, img_size=32, patch_size=8)


def test_default_is_the_papers_vit_b16():
    assert DEFAULT_TEACHER == "vit_base_patch16_224"


def test_tiny_vit_has_the_requested_shape_and_head():
    model = create_teacher(num_classes=8, **TINY).eval()
    assert len(model.blocks) == 4 and model.embed_dim == 32 and model.patch_embed.grid_size == (4, 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_img_size_argument_sets_the_patch_grid():
    model = create_teacher(num_classes=3, img_size=48, embed_dim=32, depth=1, num_heads=2, patch_size=8)
    assert model.patch_embed.grid_size == (6, 6)


def test_unknown_model_and_bad_kwargs_raise_model_error():
    with pytest.raises(ModelError, match="unknown timm model"):
        create_teacher("vit_nonexistent_patch99")
    with pytest.raises(ModelError, match="invalid argument"):
        create_teacher(num_classes=8, embed_dimension=32, **{k: v for k, v in TINY.items() if k != "embed_dim"})


def test_hub_tag_must_match_the_architecture_and_exist():
    with pytest.raises(ModelError, match="is for architecture 'vit_small_patch16_224'"):
        create_teacher("vit_base_patch16_224", pretrained="vit_small_patch16_224.augreg_in21k")
    with pytest.raises(ModelError, match="unknown pretrained tag.*augreg_in21k"):
        create_teacher("vit_base_patch16_224", pretrained="vit_base_patch16_224.no_such_tag")


def test_offline_hub_download_names_the_local_file_alternative(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    # offline with an empty cache: the download must fail the same way on every machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as info:
        create_teacher("vit_tiny_patch16_224", num_classes=8, pretrained="vit_tiny_patch16_224.augreg_in21k")
    message = str(info.value)
    assert "vit_tiny_patch16_224.augreg_in21k" in message
    assert "--pretrained /path/to/model.safetensors" in message


def test_missing_local_file_is_reported_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        create_teacher(num_classes=8, pretrained=str(tmp_path / "absent.safetensors"), **TINY)


def test_unreachable_hub_is_detected_before_any_download_retry(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants as hub_constants

    import skindistil.models.teacher as teacher

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens on this port: connections are refused at once
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert teacher.hub_reachable(timeout=1.0) is False

    seen = {}

    def fake_build(name, pretrained, kwargs):  # stands in for timm's download
        seen["offline"] = hub_constants.HF_HUB_OFFLINE
        raise OSError("no cached weights")

    monkeypatch.setattr(teacher, "_build", fake_build)
    with pytest.raises(ModelError, match="Hugging Face Hub is unreachable.*--pretrained /path/to/model.safetensors"):
        create_teacher("vit_tiny_patch16_224", num_classes=8, pretrained="vit_tiny_patch16_224.augreg_in21k")
    # timm ran with huggingface_hub in offline mode (cache only, no retries) and the flag was restored
    assert seen["offline"] is True and hub_constants.HF_HUB_OFFLINE is False

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}")
    try:
        assert teacher.hub_reachable(timeout=1.0) is True
    finally:
        listening.close()
