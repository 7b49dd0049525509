"""Explanations scored against lesion masks: the scores' definitions, mask finding and alignment with
the model's input, Grad-CAM for CNNs, and the explain / prepare / evaluate commands on real HAM10000
images with their masks."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from skindistil.cli import main
from skindistil.config import PreprocessConfig
from skindistil.data.masks import MaskLocator, read_mask
from skindistil.errors import ConfigError, ImageError
from skindistil.evaluation.localization import (
    centre_prior,
    difference_interval,
    map_correlation,
    mass_in_lesion,
    mass_ratio,
    mean_interval,
    pixel_auc,
    pointing_hit,
    random_map,
    ratio_interval,
    summarize_localization,
)
from skindistil.inference.explain import cam_layer, explanation_map, grad_cam
from skindistil.inference.localization import MaskedImage, score_localization, upsample_map
from skindistil.models import MultiExitViT, load_model, save_artifact

ISIC = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def disc(size: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    ys, xs = np.mgrid[:size, :size]
    return (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= radius**2


# ------------------------------------------------------------------------------------ the scores


def test_uniform_map_scores_the_chance_level():
    mask = disc(40, (20, 20), 8)
    flat = np.ones((40, 40))
    assert mass_in_lesion(flat, mask) == pytest.approx(mask.mean())
    assert mass_ratio(flat, mask) == pytest.approx(1.0)
    assert pixel_auc(flat, mask) == pytest.approx(0.5)
    # every pixel ties at the maximum: the hit is the share of pixels within the tolerance of the lesion
    assert pointing_hit(flat, mask, 0) == pytest.approx(mask.mean())
    assert pointing_hit(flat, mask, 3) > mask.mean()


def test_map_on_the_lesion_and_off_it():
    mask = disc(40, (20, 20), 8)
    on = mask.astype(float)
    assert mass_in_lesion(on, mask) == 1.0
    assert mass_ratio(on, mask) == pytest.approx(1 / mask.mean())
    assert pixel_auc(on, mask) == 1.0
    assert pointing_hit(on, mask, 0) == 1.0
    off = (~mask).astype(float)
    assert mass_in_lesion(off, mask) == 0.0 and pixel_auc(off, mask) == 0.0
    # the maximum 4 px beyond the lesion's edge: a hit within 5 px, a miss within 3
    peak = np.zeros((40, 40))
    peak[20, 20 + 8 + 4] = 1.0
    assert pointing_hit(peak, mask, 5) == 1.0
    assert pointing_hit(peak, mask, 3) == 0.0


def test_undefined_scores_are_nan_not_numbers():
    mask = disc(20, (10, 10), 4)
    assert math.isnan(mass_in_lesion(np.zeros((20, 20)), mask))
    empty = np.zeros((20, 20), dtype=bool)
    heat = np.random.default_rng(0).random((20, 20))
    assert math.isnan(mass_ratio(heat, empty))
    assert math.isnan(pointing_hit(heat, empty, 2))
    assert math.isnan(pixel_auc(heat, np.ones((20, 20), dtype=bool)))
    with pytest.raises(ValueError, match="boolean"):
        mass_in_lesion(heat, mask.astype(np.uint8))
    with pytest.raises(ValueError, match="non-negative"):
        mass_in_lesion(-heat, mask)


def test_baselines():
    prior = centre_prior((41, 41))
    assert prior.argmax() == 20 * 41 + 20 and prior.max() == 1.0
    sigma = 0.25 * 41
    assert prior[20, 20 + 5] == pytest.approx(math.exp(-25 / (2 * sigma**2)))
    a = random_map((8, 8), np.random.default_rng(3))
    assert np.array_equal(a, random_map((8, 8), np.random.default_rng(3)))
    assert map_correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert math.isnan(map_correlation(a, np.ones_like(a)))


def test_intervals():
    values = np.random.default_rng(1).normal(0.5, 0.1, 200)
    stats = mean_interval([*values, math.nan], seed=0)
    assert stats["n"] == 200 and stats["undefined"] == 1
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["low"] < stats["mean"] < stats["high"]
    assert stats["high"] - stats["low"] == pytest.approx(2 * 1.96 * values.std() / math.sqrt(200), rel=0.2)
    assert mean_interval(values, seed=0) == mean_interval(values, seed=0)
    assert math.isnan(mean_interval([0.3])["low"])
    diff = difference_interval(values + 0.2, values, seed=0)
    assert diff["difference"] == pytest.approx(0.2) and diff["low"] > 0
    ratio = ratio_interval(values * 0.8, values, seed=0)
    assert ratio["ratio"] == pytest.approx(0.8) and ratio["low"] == pytest.approx(0.8)  # paired: exact


def test_summary_marks_only_methods_above_both_baselines():
    rows = []
    rng = np.random.default_rng(0)
    for i in range(30):
        mask = disc(32, (int(rng.integers(8, 24)), int(rng.integers(8, 24))), 6)
        maps = {"perfect": mask.astype(float), "random": rng.random((32, 32)), "centre-prior": centre_prior((32, 32)),
                "noise": rng.random((32, 32))}
        for method, heat in maps.items():
            rows.append({"image_id": str(i), "depth": None, "method": method, "label": 0, "predicted": i % 2,
                         "probability": 1.0, "correct": i % 2 == 0, "lesion_share": mask.mean(),
                         "mass_in_lesion": mass_in_lesion(heat, mask), "mass_ratio": mass_ratio(heat, mask),
                         "pointing_hit": pointing_hit(heat, mask, 2), "pixel_auc": pixel_auc(heat, mask)})
    frame = pd.DataFrame(rows)
    frame["depth"] = frame["depth"].astype("Int64")
    summary = summarize_localization(frame, {}, seed=0)
    by_method = {e["method"]: e for e in summary["methods"]}
    assert [e["method"] for e in summary["methods"]] == ["perfect", "noise", "random", "centre-prior"]
    assert all(by_method["perfect"]["beats_baselines"].values())
    assert not any(by_method["noise"]["beats_baselines"].values())
    assert by_method["perfect"]["pixel_auc"]["mean"] == 1.0
    assert by_method["random"]["mass_ratio"]["mean"] == pytest.approx(1.0, abs=0.05)
    split = {e["method"]: e for e in summary["correct_vs_wrong"]}
    assert split["perfect"]["correct"]["n"] == 15 and split["perfect"]["wrong"]["n"] == 15


# ------------------------------------------------------------------------------------------- masks


def test_masks_are_found_by_folder_or_pattern(ham_root, tmp_path):
    folder = MaskLocator(str(ham_root / "masks"))
    assert folder.find(ham_root / "images" / "ISIC_0024306.jpg").name == "ISIC_0024306_segmentation.png"
    assert folder.find("ISIC_9999999") is None
    pattern = MaskLocator(str(tmp_path / "{stem}-lesion.png"))
    shutil.copy(ham_root / "masks" / "ISIC_0024306_segmentation.png", tmp_path / "ISIC_0024306-lesion.png")
    assert pattern.find("x/ISIC_0024306.jpg") == tmp_path / "ISIC_0024306-lesion.png"
    with pytest.raises(ConfigError, match="not a folder"):
        MaskLocator(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="only the field"):
        MaskLocator(str(tmp_path / "{name}_{stem}.png"))


def test_bad_masks_are_refused_by_name(ham_root, tmp_path):
    real = ham_root / "masks" / "ISIC_0024306_segmentation.png"
    mask = read_mask(real, size=(200, 150))
    assert mask.dtype == np.uint8 and mask.shape == (150, 200) and (mask >= 128).mean() > 0.05
    with pytest.raises(ImageError, match=r"segmentation.png: mask is 200x150 but the image of a.jpg is 400x300"):
        read_mask(real, size=(400, 300), image="a.jpg")
    colour = np.stack([mask, np.zeros_like(mask), mask], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ImageError, match="colour.png: a mask with colours"):
        read_mask(tmp_path / "colour.png")


def tiny_vit(size: int = 32, depth: int = 2, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=size, patch_size=8, embed_dim=32, depth=depth,
                             num_heads=2, mlp_ratio=2, num_classes=len(ISIC), **kwargs).eval()


@pytest.fixture(scope="module")
def vit_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit") / "model"
    return save_artifact(tiny_vit(), out, classes=ISIC, preprocess=PreprocessConfig(image_size=32))


def test_mask_follows_the_image_through_border_crop_and_resize(ham_root, vit_artifact):
    """A real image re-laid inside a black dermoscope frame: the border crop removes the frame from the
    image AND from the mask, so both come out as they do from the unframed image."""
    loaded = load_model(vit_artifact)
    image = np.asarray(Image.open(ham_root / "images" / "ISIC_0024306.jpg").convert("RGB"))
    mask = read_mask(ham_root / "masks" / "ISIC_0024306_segmentation.png")
    framed = np.zeros((150 + 40, 200 + 60, 3), np.uint8)
    framed[25:175, 20:220] = image
    framed_mask = np.zeros(framed.shape[:2], np.uint8)
    framed_mask[25:175, 20:220] = mask
    pixels, lesion = loaded.prepare_image_and_mask(framed, framed_mask)
    plain_pixels, plain_lesion = loaded.prepare_image_and_mask(image, mask)
    assert torch.equal(pixels, loaded.prepare_image(framed)) and torch.equal(pixels, plain_pixels)
    assert lesion.dtype == bool and lesion.shape == (32, 32)
    assert np.array_equal(lesion, plain_lesion) and 0.1 < lesion.mean() < 0.9
    # a flipped mask no longer matches: the comparison above can fail
    assert not np.array_equal(loaded.prepare_image_and_mask(image, mask[:, ::-1].copy())[1], plain_lesion)
    with pytest.raises(ImageError, match="lesion.jpg: mask is uint8 \\[150, 199\\]"):
        loaded.prepare_image_and_mask(image, mask[:, 1:], "lesion.jpg")


# ---------------------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_matches_its_definition_on_a_timm_cnn():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=8).eval()
    x = torch.randn(1, 3, 64, 64)
    assert cam_layer(model) is model.layer4
    heat = grad_cam(model, x, class_index=3)
    # by hand: the last stage's activations weighted by the spatial mean of the class-3 logit's gradient
    store = {}
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: store.update(a=out))
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits[0, 3], store["a"])
    cam = (grad.mean(dim=(2, 3), keepdim=True) * store["a"]).sum(dim=1)[0].clamp(min=0).detach()
    assert heat.shape == (2, 2) and heat.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(heat, (cam / cam.sum()).numpy(), rtol=1e-4, atol=1e-6)
    # the default explains the predicted class, and inference mode does not stop it
    with torch.inference_mode():
        predicted = explanation_map(model, x, "gradcam")
    np.testing.assert_allclose(predicted, grad_cam(model, x, int(logits.argmax())), rtol=1e-5)


def test_methods_refuse_the_other_architecture():
    cnn = timm.create_model("resnet18", num_classes=8).eval()
    with pytest.raises(ConfigError, match="'rollout' explains ViTs, but resnet18 is a CNN: use gradcam"):
        explanation_map(cnn, torch.randn(1, 3, 32, 32), "rollout")
    with pytest.raises(ConfigError, match="'gradcam' explains CNNs, .* is a ViT: use rollout or grad-rollout"):
        explanation_map(tiny_vit(), torch.randn(1, 3, 32, 32), "gradcam")


def test_upsampling_keeps_a_patch_where_it_is():
    grid = np.zeros((4, 4))
    grid[0, 3] = 1.0
    up = upsample_map(grid, 32)
    assert up.shape == (32, 32) and up.min() >= 0
    assert np.unravel_index(up.argmax(), up.shape)[0] < 8 and np.unravel_index(up.argmax(), up.shape)[1] >= 24


# ------------------------------------------------------------------------------- scoring a model


def test_reference_equal_to_the_model_correlates_fully(ham_root, vit_artifact):
    loaded = load_model(vit_artifact)
    items = []
    for stem in ("ISIC_0024306", "ISIC_0024307", "ISIC_0024308", "ISIC_0024309"):
        image = Image.open(ham_root / "images" / f"{stem}.jpg").convert("RGB")
        mask = read_mask(ham_root / "masks" / f"{stem}_segmentation.png", size=image.size)
        items.append(MaskedImage(stem, *loaded.prepare_image_and_mask(image, mask), label=1))
    frame = score_localization(loaded, items, reference=loaded)
    assert len(frame) == 4 * 4 and list(frame["method"][:4]) == ["rollout", "grad-rollout", "random", "centre-prior"]
    explained = frame[frame["method"].isin(["rollout", "grad-rollout"])]
    np.testing.assert_allclose(explained["map_correlation"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(explained["reference_mass_in_lesion"], explained["mass_in_lesion"])
    assert frame["correct"].tolist() == (frame["predicted"] == 1).tolist()
    other = save_artifact(tiny_vit(size=48), vit_artifact.parent.parent / "other" / "model", classes=ISIC,
                          preprocess=PreprocessConfig(image_size=48))
    with pytest.raises(ConfigError, match="input geometry"):
        score_localization(loaded, items, reference=load_model(other))


def test_explain_with_masks_on_real_images(ham_root, vit_artifact, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    stems = sorted(p.stem for p in (ham_root / "images").glob("ISIC_00243*.jpg"))[:6]
    for stem in stems:
        shutil.copy(ham_root / "images" / f"{stem}.jpg", images)
    shutil.copy(ham_root / "images" / f"{stems[0]}.jpg", images / "no_mask_here.jpg")
    out = tmp_path / "loc"
    code = main(["explain", "--model", str(vit_artifact), str(images), "--masks", str(ham_root / "masks"),
                 "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "no_mask_here.jpg: no mask" in err
    frame = pd.read_csv(out / "localization.csv")
    assert sorted(frame["image_id"].unique()) == stems
    assert frame.groupby("method").size().to_dict() == {m: 6 for m in ("rollout", "grad-rollout", "random",
                                                                        "centre-prior")}
    summary = json.loads((out / "localization.json").read_text())
    rows = {e["method"]: e for e in summary["methods"]}
    for method, group in frame.groupby("method"):
        assert rows[method]["mass_ratio"]["mean"] == pytest.approx(group["mass_ratio"].mean())
    assert summary["settings"]["pointing_tolerance_px"] == pytest.approx(15 / 224 * 32, abs=0.01)
    assert "no mask" in summary["notes"][0]
    assert not list(out.glob("*.png"))  # overlays only on request with --masks
    assert "| centre-prior | 6 |" in (out / "localization.md").read_text()


# ----------------------------------------------------------------------- prepare and evaluate


@pytest.fixture(scope="module")
def ham_masked(ham_root, tmp_path_factory):
    """60 real HAM10000 images with ISIC 2019 labels, prepared with their masks (5 masks withheld)."""
    from skindistil.data.prepare import prepare_dataset
    from skindistil.data.sources import build_source

    base = tmp_path_factory.mktemp("ham_masked")
    masks = base / "masks"
    masks.mkdir()
    for i, path in enumerate(sorted((ham_root / "masks").glob("*.png"))):
        if i % 7:  # every 7th mask is left out
            (masks / path.name).symlink_to(path)
    source = build_source("ham10000", ham_root, labels="isic2019")
    out = base / "data"
    result = prepare_dataset(source, out, limit=60, short_side=48, workers=0, progress=False, masks=masks)
    return out, masks, result


def test_prepare_keeps_masks_beside_the_images(ham_root, ham_masked):
    from skindistil.data.imageio import resize_shorter
    from skindistil.data.prepare import load_manifest

    data_dir, masks, result = ham_masked
    frame, info = load_manifest(data_dir)
    has = frame["mask_file"] != ""
    assert info["num_masks"] == result.num_masks == has.sum() and 0 < (~has).sum() < 20
    assert any("have no mask" in note for note in result.notes)
    for row in frame[has].head(5).itertuples():
        cached = np.load(data_dir / row.mask_file)
        assert cached.shape == (row.height, row.width)
        # read_mask, not Image.open: some of these masks are palette PNGs whose indices are not grey levels
        source = Image.fromarray(read_mask(ham_root / "masks" / f"{row.image_id}_segmentation.png"))
        box = (row.crop_x0, row.crop_y0, row.crop_x1, row.crop_y1)
        assert np.array_equal(cached, np.asarray(resize_shorter(source.crop(box), 48)))
    for row in frame[~has].itertuples():
        assert not (masks / f"{row.image_id}_segmentation.png").exists()


def test_evaluate_localization_on_a_prepared_split(ham_masked, vit_artifact, tmp_path, capsys):
    data_dir, _, _ = ham_masked
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(vit_artifact), "--data", str(data_dir), "--split", "train",
                 "--localization", "--reference", str(vit_artifact), "--workers", "0", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "localization.json").read_text())
    frame = pd.read_csv(out / "localization.csv")
    from skindistil.data.prepare import load_manifest

    manifest, _ = load_manifest(data_dir)
    train = manifest[manifest["split"] == "train"]
    assert summary["images"] == (train["mask_file"] != "").sum() == frame["image_id"].nunique()
    assert set(frame["label"]) <= set(range(8))
    reference = {e["method"]: e for e in summary["reference"]}
    assert reference["rollout"]["map_correlation"]["mean"] == pytest.approx(1.0)
    assert reference["grad-rollout"]["retention"]["ratio"] == pytest.approx(1.0)
    assert "Against the reference model" in capsys.readouterr().out
    assert (out / "metrics.json").is_file()


def test_prepared_masks_reach_the_model_aligned_with_its_input(ham_root, ham_masked, vit_artifact):
    """The cached mask, through the model's eval geometry, covers the same pixels as the original mask
    taken straight to the model's input (two resizes instead of one: nearly, not exactly, the same)."""
    from skindistil.inference.localization import masked_split

    loaded = load_model(vit_artifact)
    items, unmasked = masked_split(loaded, ham_masked[0], "train")
    assert unmasked > 0 and len(items) > 20
    ious = []
    for item in items[:12]:
        image = Image.open(ham_root / "images" / f"{item.image_id}.jpg").convert("RGB")
        mask = read_mask(ham_root / "masks" / f"{item.image_id}_segmentation.png", size=image.size)
        _, direct = loaded.prepare_image_and_mask(image, mask)
        ious.append((direct & item.mask).sum() / max((direct | item.mask).sum(), 1))
    assert np.mean(ious) > 0.9, ious


def test_per_exit_scores_every_depth(ham_masked, tmp_path):
    from skindistil.inference.localization import evaluate_localization

    model = MultiExitViT(tiny_vit(depth=3), exits=[1, 3]).eval()
    artifact = save_artifact(model, tmp_path / "fcvit" / "model", classes=ISIC, preprocess=PreprocessConfig(image_size=32))
    summary = evaluate_localization(artifact, ham_masked[0], "val", tmp_path / "out", ["rollout"], per_exit=True)
    depths = [(e["depth"], e["method"]) for e in summary["methods"]]
    assert depths == [(1, "rollout"), (3, "rollout"), (None, "random"), (None, "centre-prior")]
    frame = pd.read_csv(tmp_path / "out" / "localization.csv")
    one, three = (frame[frame["depth"] == d].set_index("image_id")["mass_in_lesion"] for d in (1, 3))
    assert not np.allclose(one, three)  # each exit is explained through its own blocks


def test_localization_flags_need_masks(vit_artifact, ham_root, tmp_path, capsys):
    image = str(ham_root / "images" / "ISIC_0024306.jpg")
    assert main(["explain", "--model", str(vit_artifact), image, "--out", str(tmp_path),
                 "--reference", str(vit_artifact)]) == 1
    assert "give --masks" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(vit_artifact), "--data", str(tmp_path), "--per-exit"]) == 1
    assert "belong to --localization" in capsys.readouterr().err
    assert main(["explain", "--model", str(vit_artifact), image, "--out", str(tmp_path), "--method", "gradcam"]) == 1
    assert "is a ViT: use rollout or grad-rollout" in capsys.readouterr().err


def test_run_report_answers_the_questions_with_numbers(ham_masked, vit_artifact, tmp_path):
    from skindistil.config import RunConfig
    from skindistil.data.prepare import load_manifest
    from skindistil.evaluation.document import Document
    from skindistil.experiments.pipeline import ModelEntry
    from skindistil.experiments.run_report import _localization_section

    data_dir = ham_masked[0]
    entries = []
    for role in ("teacher", "student"):
        shutil.copytree(vit_artifact, tmp_path / role / "model")
        entries.append(ModelEntry(role, tmp_path / role, role, "distilvit"))
    cfg = RunConfig.from_dict({"split": "val", "localization_images": 5})
    doc = Document("run")
    _localization_section(doc, cfg, data_dir, load_manifest(data_dir)[1], entries)
    text = doc.markdown()
    assert "Where the models look (val, lesion masks)" in text and "5 masked images" in text
    assert "| teacher: rollout |" in text and "| centre-prior |" in text
    assert "student against the teacher, rollout: map correlation 1.000" in text
    frame = pd.read_csv(tmp_path / "student" / "eval" / "val" / "localization.csv")
    assert frame["image_id"].nunique() == 5 and (frame["map_correlation"].dropna() > 0.999).all()
