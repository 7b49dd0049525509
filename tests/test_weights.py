"""Weight import: timm files (plain and wrapped), pos-embed resampling, transformers ViT checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from skindistil.errors import ModelError
from skindistil.models import create_teacher, load_weights

TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)


class Opaque:
    """An object that a weights_only torch.load refuses to unpickle."""


def _tiny(num_classes=5, **overrides):
    torch.manual_seed(len(overrides) + num_classes)
    return create_teacher(num_classes=num_classes, **{**TINY, **overrides}).eval()


def _body_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


def test_timm_safetensors_with_kept_head_reproduces_the_logits(tmp_path):
    source = _tiny()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_teacher(num_classes=5, pretrained=str(path), keep_head=True, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), source(x))


def test_wrapped_torch_checkpoint_loads_and_reinitialises_a_foreign_head(tmp_path):
    source = _tiny(num_classes=5)
    path = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    model = _tiny(num_classes=8)
    head_before = model.head.weight.clone()
    report = load_weights(model, path)
    assert report.layout == "timm" and report.head == "reinitialised"
    assert _body_equal(model, source)
    assert torch.equal(model.head.weight, head_before)


def test_same_class_count_head_is_dropped_unless_kept(tmp_path):
    source = _tiny(num_classes=5)
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    assert load_weights(_tiny(num_classes=5), path).head == "reinitialised"
    model = _tiny(num_classes=5)
    assert load_weights(model, path, keep_head=True).head == "kept"
    assert torch.equal(model.head.weight, source.head.weight)


def test_position_embedding_is_resampled_to_a_new_grid(tmp_path):
    source = _tiny()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = _tiny(img_size=48)
    report = load_weights(model, path)
    assert report.resampled_pos_embed
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])  # class-token position kept as is
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_architecture_mismatch_lists_the_offending_tensors(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file(_tiny(depth=4).state_dict(), str(path))
    with pytest.raises(ModelError, match=r"unexpected \[\d+\]: blocks\.2\."):
        load_weights(_tiny(depth=2), path)
    save_file(_tiny(embed_dim=64).state_dict(), str(path))
    with pytest.raises(ModelError, match="shape mismatch"):
        load_weights(_tiny(), path)


def test_bad_files_raise_model_error_naming_the_file(tmp_path):
    not_vit = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_vit))
    with pytest.raises(ModelError, match="other.safetensors: not ViT weights"):
        load_weights(_tiny(), not_vit)

    good = tmp_path / "good.safetensors"
    save_file(_tiny().state_dict(), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated.safetensors"):
        load_weights(_tiny(), truncated)

    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": _tiny().state_dict(), "extra": Opaque()}, pickled)
    with pytest.raises(ModelError, match=r"pickled.pth: holds Python objects besides tensors.*\(test_weights.Opaque\)"):
        load_weights(_tiny(), pickled)

    torch_file = tmp_path / "last.pth.tar"
    torch.save({"state_dict": _tiny().state_dict()}, torch_file)
    torch_file.write_bytes(torch_file.read_bytes()[:1000])
    with pytest.raises(ModelError, match=r"last.pth.tar: cannot be read as a torch checkpoint \(truncated or corrupt"):
        load_weights(_tiny(), torch_file)

    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ModelError, match="unknown weight file type"):
        load_weights(_tiny(), tmp_path / "w.txt")


# --------------------------------------------------------------------------- transformers checkpoints


def _hf_config(**overrides):
    from transformers import ViTConfig

    settings = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=5, layer_norm_eps=1e-6, hidden_act="gelu",
    )
    return ViTConfig(**{**settings, **overrides})


def test_transformers_classifier_imports_with_equal_logits(tmp_path):
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    hf = ViTForImageClassification(_hf_config()).eval()
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    for source in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        model = create_teacher(num_classes=5, pretrained=str(source), keep_head=True, **TINY).eval()
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-4)

    # another class count: the body is imported, the classifier is not
    model = create_teacher(num_classes=8, pretrained=str(tmp_path / "hf"), **TINY).eval()
    report = load_weights(model, tmp_path / "hf")
    assert report.layout == "transformers" and report.head == "reinitialised"
    with torch.no_grad():
        features = model.forward_features(x)[:, 0]
        hidden = hf.vit(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(features, hidden, atol=1e-4)


def test_transformers_base_model_drops_its_pooler(tmp_path):
    from transformers import ViTModel

    torch.manual_seed(1)
    hf = ViTModel(_hf_config()).eval()  # the in21k checkpoints are ViTModel with a pooler
    hf.save_pretrained(tmp_path / "in21k")
    model = create_teacher(num_classes=8, **TINY).eval()
    report = load_weights(model, tmp_path / "in21k")
    assert report.head == "reinitialised"
    assert any(name.startswith("pooler.") for name in report.dropped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-4)


def test_transformers_checkpoint_with_another_activation_is_refused(tmp_path):
    from transformers import ViTModel

    ViTModel(_hf_config(hidden_act="gelu_new")).save_pretrained(tmp_path / "tanh")
    with pytest.raises(ModelError, match="hidden_act='gelu_new'"):
        load_weights(create_teacher(num_classes=8, **TINY), tmp_path / "tanh")


def test_checkpoint_holding_two_vits_is_ambiguous(tmp_path):
    state = {f"{owner}.{k}": v for owner in ("teacher", "student") for k, v in _tiny().state_dict().items()}
    path = tmp_path / "distiller.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match="several ViTs.*'student.', 'teacher.'"):
        load_weights(_tiny(), path)
