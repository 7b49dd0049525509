"""config.json is checked on every load (issue 12, section 3): a bad artifact is refused naming the field,
nothing is allocated for an absurd architecture, and no NaN ever leaves predict or serve."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from skindistil.cli import main as cli_main
from skindistil.config import PreprocessConfig
from skindistil.errors import ConfigError, ModelError
from skindistil.models import MultiExitViT, create_teacher, load_model, save_artifact
from skindistil.models.artifact import set_calibration

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]


def _save(out, depth_vit=False):
    torch.manual_seed(0)
    model = create_teacher(num_classes=8, embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8).eval()
    if depth_vit:
        model = MultiExitViT(model, exits=[1, 2])
    return save_artifact(model, out, classes=CLASSES, preprocess=PreprocessConfig(image_size=32))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("schema") / "model")


def _edited(artifact, tmp_path, edit, depth_vit=False):
    """A copy of the artifact whose config.json went through edit(config) (or is the text edit returns)."""
    out = _save(tmp_path / "model", depth_vit) if depth_vit else tmp_path / "model"
    if not depth_vit:
        out.mkdir()
        for f in artifact.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    text = edit(config)
    (out / "config.json").write_text(text if isinstance(text, str) else json.dumps(config))
    return out


def _kw(**values):
    return lambda c: c["model_args"].update(values)


BAD_CONFIGS = {
    "zero std": (lambda c: c["preprocess"].update(std=[0, 0, 0]), r"preprocess\.std: expected 3 finite numbers > 0"),
    "negative std": (lambda c: c["preprocess"].update(std=[0.5, -0.5, 0.5]), r"preprocess\.std"),
    "temperature 0": (
        lambda c: c.update(calibration={"temperature": 0.0, "fitted_on": "x"}),
        r"calibration\.temperature: Input should be greater than 0",
    ),
    "negative temperature": (
        lambda c: c.update(calibration={"temperature": -1.5, "fitted_on": "x"}),
        r"calibration\.temperature: Input should be greater than 0 \(got -1\.5\)",
    ),
    "bare NaN temperature": (
        lambda c: json.dumps({**c, "calibration": {"temperature": float("nan"), "fitted_on": "x"}}),
        r"config\.json: not valid JSON \(NaN is not a JSON value",
    ),
    "null temperature": (
        lambda c: c.update(calibration={"temperature": None, "fitted_on": "x"}),
        r"calibration\.temperature: Input should be a valid number",
    ),
    "num_heads 0": (_kw(num_heads=0), r"architecture\.kwargs\.num_heads: Input should be greater than or equal to 1"),
    "heads do not divide width": (_kw(num_heads=3), r"embed_dim 32 is not divisible by num_heads 3"),
    "patch_size 0": (_kw(patch_size=0), r"architecture\.kwargs\.patch_size: expected a side"),
    "depth 200,000": (_kw(depth=200_000), r"architecture\.kwargs\.depth: Input should be less than or equal to 64"),
    "img_size 100,000": (_kw(img_size=100_000), r"architecture\.kwargs\.img_size: expected a side"),
    "input size 100,000": (
        lambda c: c["preprocess"].update(image_size=100_000),
        r"preprocess\.image_size: expected an integer 1\.\.1024, got 100000",
    ),
    "crop fraction blows the resize up": (
        lambda c: c["preprocess"].update(crop_fraction=0.001),
        r"preprocess\.crop_fraction: .* resizes images to 32000 px",
    ),
    "input size is not the model's": (lambda c: c["preprocess"].update(image_size=48), r"img_size \[32, 32\] differs from preprocess\.image_size 48"),
    "3 class names for 8 outputs": (
        lambda c: c.update(classes=["MEL", "NV", "BCC"]),
        r"architecture\.kwargs\.num_classes is 8 but 3 class names are listed",
    ),
    "duplicate class names": (lambda c: c.update(classes=CLASSES[:7] + ["MEL"]), r"classes: duplicate class name\(s\) MEL"),
    "empty class name": (lambda c: c.update(classes=CLASSES[:7] + [""]), r"classes\.7: String should have at least 1 character"),
    "checkpoint_path kwarg": (_kw(checkpoint_path="/tmp/x.pth"), r"architecture\.kwargs\.checkpoint_path: Extra inputs are not permitted"),
    "pretrained kwarg": (_kw(pretrained=True), r"architecture\.kwargs\.pretrained: Extra inputs are not permitted"),
    "string for a boolean": (_kw(qkv_bias="false"), r"architecture\.kwargs\.qkv_bias: Input should be a valid boolean"),
    "not a ViT": (lambda c: c.update(architecture="resnet50"), r"architecture\.name: 'resnet50' is not a timm model"),
    "4 input channels": (_kw(in_chans=4), r"architecture\.kwargs\.in_chans: Input should be 3"),
    "unknown top-level key": (lambda c: c.update(temprature=2.0), r"temprature: Extra inputs are not permitted"),
    "missing classes": (lambda c: c.pop("classes"), r"classes: Field required"),
    "wrong parameter count": (
        lambda c: c.update(num_parameters=c["num_parameters"] + 1),
        r"num_parameters: config\.json records 32,489 parameters but its architecture has 32,488",
    ),
    "exits on a plain ViT": (lambda c: c.update(exits=[1, 2]), r"exits and shared_head belong to kind 'depth_vit' only"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_is_refused_naming_the_field(artifact, tmp_path, case):
    edit, message = BAD_CONFIGS[case]
    out = _edited(artifact, tmp_path, edit)
    with pytest.raises(ModelError, match=message) as info:
        load_model(out)
    assert str(out / "config.json") in str(info.value)


def test_multi_exit_vit_exits_are_checked(tmp_path, artifact):
    out = _edited(artifact, tmp_path, lambda c: c.update(exits=[2, 1]), depth_vit=True)
    with pytest.raises(ModelError, match=r"config\.json: exits=\[2, 1\]: expected ascending, unique depths"):
        load_model(out)


def test_an_oversized_architecture_is_refused_before_any_allocation(artifact, tmp_path):
    # 64 blocks of width 8192: 51.5 billion parameters, 206 GB of float32 if it were allocated
    out = _edited(artifact, tmp_path, _kw(depth=64, embed_dim=8192, num_heads=64))
    started = time.perf_counter()
    with pytest.raises(ModelError, match=r"architecture has 51,548,233,736 parameters, over the limit of 2,000,000,000"):
        load_model(out)
    assert time.perf_counter() - started < 20  # counted on the meta device, never built for real


def test_every_artifact_written_passes_the_schema(tmp_path):
    model = create_teacher(num_classes=8, embed_dim=32, depth=1, num_heads=2, img_size=32, patch_size=8)
    with pytest.raises(ModelError, match=r"classes: duplicate class name\(s\) NV"):
        save_artifact(model, tmp_path / "a", classes=["NV"] * 8, preprocess=PreprocessConfig(image_size=32))
    with pytest.raises(ModelError, match=r"img_size \[32, 32\] differs from preprocess\.image_size 64"):
        save_artifact(model, tmp_path / "b", classes=CLASSES, preprocess=PreprocessConfig(image_size=64))
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "config.json").exists()
    with pytest.raises(ConfigError, match=r"preprocess\.std"):
        PreprocessConfig(std=(0.5, float("nan"), 0.5))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_set_calibration_refuses_a_temperature_that_is_not_finite_and_positive(artifact, tmp_path, temperature):
    out = _edited(artifact, tmp_path, lambda c: None)
    before = (out / "config.json").read_text()
    with pytest.raises(ModelError, match=r"calibration\.temperature"):
        set_calibration(out, temperature, fitted_on="val")
    assert (out / "config.json").read_text() == before


def test_non_finite_weights_are_refused_naming_the_tensor(artifact, tmp_path):
    out = _edited(artifact, tmp_path, lambda c: None)
    state = load_file(str(out / "model.safetensors"))
    state["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ModelError, match=r"model\.safetensors: 1 tensor\(s\) hold NaN or infinite values: blocks\.1\.mlp\.fc2\.weight"):
        load_model(out)


def test_non_finite_probabilities_are_an_error_in_predict(artifact, tmp_path, ham_root, capsys):
    """A finite, positive but tiny temperature overflows the logits: the probabilities are NaN. predict
    fails with a message (exit 1), writes no file, and never prints a number."""
    out = _edited(artifact, tmp_path, lambda c: c.update(calibration={"temperature": 1e-300, "fitted_on": "x"}))
    images = sorted((ham_root / "images").glob("*.jpg"))[:3]
    loaded = load_model(out)
    with pytest.raises(ModelError, match=r"non-finite probabilities \(NaN or infinity\) for 3 of 3 image\(s\)"):
        loaded.predict(images)
    for extra in ([], ["--tta"]):
        capsys.readouterr()
        target = tmp_path / f"p{len(extra)}.json"
        code = cli_main(["predict", "--model", str(out), *map(str, images), "--out", str(target), "--no-progress", *extra])
        assert code == 1 and not target.exists()
        assert "non-finite probabilities" in capsys.readouterr().err
    # the same artifact at temperature 1 predicts finite probabilities that sum to 1
    set_calibration(out, 1.0, fitted_on="x")
    probs = load_model(out).predict(images)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_serve_refuses_to_start_on_a_bad_artifact(artifact, tmp_path, capsys):
    from skindistil.serve import create_app

    out = _edited(artifact, tmp_path, lambda c: c.update(classes=["MEL", "NV", "BCC"]))
    with pytest.raises(ModelError, match="8 but 3 class names"):
        create_app(out)
    assert cli_main(["serve", "--model", str(out), "--port", "0"]) == 1
    assert "architecture.kwargs.num_classes is 8 but 3 class names are listed" in capsys.readouterr().err


def test_serve_refuses_to_start_when_the_model_gives_non_finite_probabilities(artifact, tmp_path):
    """The start-up warm-up runs the model: an artifact that overflows never answers a request."""
    from skindistil.serve import create_app, serve_in_background

    out = _edited(artifact, tmp_path, lambda c: c.update(calibration={"temperature": 1e-300, "fitted_on": "x"}))
    app = create_app(out, max_batch=2)
    with pytest.raises(RuntimeError, match="did not start"), serve_in_background(app, timeout=30):
        pass


# --------------------------------------------------------------- kind "timm": any timm classifier


@pytest.fixture(scope="module")
def resnet_artifact(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=8, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64],
                              stem_width=8).eval()
    arch = {"name": "resnet18", "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}}
    return save_artifact(model, tmp_path_factory.mktemp("timm") / "model", arch=arch, classes=CLASSES,
                         preprocess=PreprocessConfig(image_size=32))


BAD_TIMM_CONFIGS = {
    "checkpoint path": (_kw(checkpoint_path="/etc/passwd"), r"checkpoint_path: not allowed in an artifact"),
    "pretrained": (_kw(pretrained=True), r"pretrained: not allowed"),
    "object value": (_kw(stem_width={"a": 1}), r"stem_width: expected a number, string, boolean or a list"),
    "unknown model": (lambda c: c.update(architecture="resnet_999"), r"'resnet_999' is not a timm model"),
    "class count": (_kw(num_classes=3), r"num_classes is 3 but 8 class names"),
    "exits": (lambda c: c.update(exits=[1]), r"exits and shared_head belong to kind 'depth_vit' only"),
}


@pytest.mark.parametrize("case", list(BAD_TIMM_CONFIGS))
def test_timm_kind_config_refused_naming_the_field(resnet_artifact, tmp_path, case):
    edit, message = BAD_TIMM_CONFIGS[case]
    assert load_model(resnet_artifact).config["kind"] == "timm"
    with pytest.raises(ModelError, match=message):
        load_model(_edited(resnet_artifact, tmp_path, edit))
