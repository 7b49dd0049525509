"""Score where a model looks against lesion masks: explanation maps vs masks, per image and summarised.

For each image the model's input (uint8 [3, S, S]) and its mask (bool [S, S]) come out of ONE
geometry: the artifact's border crop (the box found on the image), shorter side to resize_size,
centre crop (`LoadedModel.prepare_image_and_mask` for image files; for a prepared split the cached
image and the mask cached beside it by `prepare --masks`, through `eval_resize_crop`). Each method's
map (`skindistil.inference.explain.explanation_map`, at its own grid) is upsampled bilinearly to S x S
and scored by `skindistil.evaluation.localization`; the random map and the centre prior are scored
on the same masks as baselines. Class-specific methods explain the predicted class.

With a `reference` model (the teacher of a student), the same method's maps of both are compared per
image: Pearson correlation over pixels, and the student's mass in lesion against the teacher's
(retention). A per-depth-head model (FCViT) can be scored at every exit (`per_exit`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from skindistil.data.masks import MASK_THRESHOLD, MaskLocator, read_mask
from skindistil.data.records import Problem
from skindistil.errors import ConfigError, DataError, ImageError
from skindistil.evaluation.localization import (
    CENTRE_SIGMA_FRACTION,
    centre_prior,
    localization_scores,
    map_correlation,
    pointing_tolerance,
    random_map,
    render_localization_md,
    summarize_localization,
)
from skindistil.files import write_csv, write_json, write_text
from skindistil.inference.explain import check_method, explanation_map, methods_for
from skindistil.models.artifact import LoadedModel
from skindistil.models.multi_exit import MultiExitViT

BASELINES = ("random", "centre-prior")
PER_IMAGE_CSV = "localization.csv"
SUMMARY_JSON = "localization.json"
SUMMARY_MD = "localization.md"


@dataclass
class MaskedImage:
    """One image as the model sees it (uint8 [3, S, S], before normalisation), its lesion mask at the
    same pixels (bool [S, S]) and its label (index into the model's classes; None when unknown)."""

    image_id: str
    image: torch.Tensor
    mask: np.ndarray
    label: int | None = None


# ------------------------------------------------------------------------------------------ inputs


def masked_files(
    loaded: LoadedModel,
    paths: Iterable[str | Path],
    masks: MaskLocator,
    on_error: Callable[[Problem], None],
) -> Iterator[MaskedImage]:
    """MaskedImages for image files; an image without a mask, or an unreadable image or mask, is
    reported to `on_error` and skipped. The image id is the file's stem."""
    from skindistil.data.imageio import read_image

    for path in paths:
        path = Path(path)
        mask_path = masks.find(path)
        if mask_path is None:
            tried = ", ".join(str(p) for p in masks.candidates(path.stem))
            on_error(Problem(str(path), f"no mask (looked for {tried})"))
            continue
        try:
            image = read_image(path)
            mask = read_mask(mask_path, size=image.size, image=str(path))
            pixels, lesion = loaded.prepare_image_and_mask(image, mask, str(path))
        except ImageError as exc:
            on_error(Problem(exc.where, exc.reason))
            continue
        yield MaskedImage(path.stem, pixels, lesion)


def masked_split(loaded: LoadedModel, data_dir: str | Path, split: str) -> tuple[list[MaskedImage], int]:
    """The images of `split` of a prepared dataset that have a mask (prepared with `--masks`), through
    the model's eval geometry, with their labels; and how many images of the split have none.
    DataError when the split has no masks at all or its classes differ from the model's."""
    from skindistil.data.datamodule import load_cached_image, load_cached_mask
    from skindistil.data.prepare import MASK_COLUMN, load_manifest
    from skindistil.data.transforms import eval_resize_crop

    data_dir = Path(data_dir)
    frame, info = load_manifest(data_dir)
    if list(info.get("classes", [])) != list(loaded.classes):
        raise DataError(data_dir, f"dataset classes {info.get('classes')} differ from the model's {loaded.classes}")
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise DataError(data_dir, f"split {split!r} has no images")
    with_mask = rows[rows[MASK_COLUMN] != ""]
    if with_mask.empty:
        raise DataError(data_dir, f"split {split!r} has no lesion masks; prepare the dataset with --masks DIR")
    items = []
    for row in with_mask.itertuples(index=False):
        hw = (int(row.height), int(row.width))
        image = load_cached_image(data_dir / row.cache_file, hw)
        mask = load_cached_mask(data_dir / getattr(row, MASK_COLUMN), hw)
        pixels = eval_resize_crop(torch.from_numpy(image).permute(2, 0, 1), loaded.preprocess)
        lesion = eval_resize_crop(torch.from_numpy(mask)[None], loaded.preprocess)[0] >= MASK_THRESHOLD
        items.append(MaskedImage(str(row.image_id), pixels, lesion.numpy(), int(row.label)))
    return items, len(rows) - len(with_mask)


# ----------------------------------------------------------------------------------------- scoring


def upsample_map(heat: np.ndarray, size: int) -> np.ndarray:
    """A map [h, w] at its method's grid -> [size, size], bilinear (half-pixel centres), clamped at 0."""
    tensor = torch.from_numpy(np.asarray(heat, dtype=np.float32))[None, None]
    up = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return up[0, 0].clamp(min=0).numpy()


def _same_geometry(a: LoadedModel, b: LoadedModel) -> bool:
    keys = ("image_size", "resize_size", "border_crop", "border_threshold", "interpolation")
    return all(getattr(a.preprocess, k) == getattr(b.preprocess, k) for k in keys)


def scored_models(loaded: LoadedModel, per_exit: bool) -> list[tuple[int | None, nn.Module]]:
    """(depth, network) pairs to explain: the model itself (depth None), or with `per_exit` one plain
    ViT per exit of a per-depth-head model (`MultiExitViT.truncate`)."""
    if not per_exit:
        return [(None, loaded.model)]
    if not isinstance(loaded.model, MultiExitViT):
        raise ConfigError(f"{loaded.path}: --per-exit needs a model with per-depth heads (FCViT); this one has one exit")
    return [(depth, loaded.model.truncate(depth).eval()) for depth in loaded.model.exits]


def score_localization(
    loaded: LoadedModel,
    items: Iterable[MaskedImage],
    methods: Sequence[str] | None = None,
    *,
    reference: LoadedModel | None = None,
    per_exit: bool = False,
    seed: int = 0,
    head_fusion: str = "mean",
) -> pd.DataFrame:
    """One row per (image, depth, method): the scores of `skindistil.evaluation.localization`, the
    prediction (`predicted`, `probability`, and `correct` when the label is known), and with
    `reference` the reference's `reference_mass_in_lesion` and the `map_correlation` of the two maps.
    Baseline rows (method "random", "centre-prior") follow each image's methods; the random map of
    image i is drawn from seed (seed, i). `methods` default: every method of the model's architecture.
    """
    networks = scored_models(loaded, per_exit)
    methods = list(methods or methods_for(loaded.model))
    for method in methods:
        check_method(loaded.model, method)
    if reference is not None:
        if not _same_geometry(loaded, reference):
            raise ConfigError(f"reference {reference.path}: its input geometry ({reference.preprocess}) differs from "
                              f"{loaded.path}'s ({loaded.preprocess}); maps could not be compared pixel for pixel")
        if list(reference.classes) != list(loaded.classes):
            raise ConfigError(f"reference {reference.path}: classes {reference.classes} differ from {loaded.classes}")
    shared = [m for m in methods if reference is not None and m in methods_for(reference.model)]
    size = loaded.preprocess.image_size
    tolerance = pointing_tolerance(size)
    centre = centre_prior((size, size))
    rows = []
    for index, item in enumerate(items):
        if item.mask.shape != (size, size):
            raise DataError(item.image_id, f"mask is {list(item.mask.shape)}, the model's input is {size}x{size}")
        batch = loaded.normalize(item.image[None].to(loaded.device))
        ref_maps = {}
        if shared:
            ref_batch = reference.normalize(item.image[None].to(reference.device))
            for method in shared:
                ref_maps[method] = upsample_map(explanation_map(reference.model, ref_batch, method,
                                                                head_fusion=head_fusion), size)
        for depth, network in networks:
            with torch.inference_mode():
                probs = loaded.probabilities(network(batch))[0].cpu()
            predicted = int(probs.argmax())
            base = {
                "image_id": item.image_id,
                "depth": depth,
                "label": item.label,
                "predicted": predicted,
                "probability": float(probs[predicted]),
                "correct": None if item.label is None else predicted == item.label,
            }
            for method in methods:
                heat = upsample_map(explanation_map(network, batch, method, predicted, head_fusion), size)
                row = {**base, "method": method, **localization_scores(heat, item.mask, tolerance)}
                if method in ref_maps:
                    row["reference_mass_in_lesion"] = localization_scores(ref_maps[method], item.mask,
                                                                          tolerance)["mass_in_lesion"]
                    row["map_correlation"] = map_correlation(heat, ref_maps[method])
                rows.append(row)
        rng = np.random.default_rng([seed, index])
        for method, heat in (("random", random_map((size, size), rng)), ("centre-prior", centre)):
            rows.append({**base, "depth": None, "method": method,
                         **localization_scores(heat, item.mask, tolerance)})
    columns = ["image_id", "depth", "method", "label", "predicted", "probability", "correct", "lesion_share",
               "mass_in_lesion", "mass_ratio", "pointing_hit", "pixel_auc"]
    if shared:
        columns += ["reference_mass_in_lesion", "map_correlation"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["depth"] = frame["depth"].astype("Int64")
    return frame


def localization_settings(loaded: LoadedModel, seed: int, **extra) -> dict:
    """The rules the scores were computed by, recorded beside them."""
    size = loaded.preprocess.image_size
    return {
        "input_size": size,
        "mask_threshold": MASK_THRESHOLD,
        "pointing_tolerance_px": round(pointing_tolerance(size), 2),
        "centre_prior_sigma_px": round(CENTRE_SIGMA_FRACTION * size, 2),
        "map_upsampling": "bilinear to the input size",
        "explained_class": "predicted",
        "bootstrap": "95% percentile interval over images, 2000 resamples",
        "seed": seed,
        **extra,
    }


def write_localization(frame: pd.DataFrame, summary: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write localization.csv (per image), localization.json and localization.md (the summary) to
    `out_dir`, each atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / PER_IMAGE_CSV, "json": out_dir / SUMMARY_JSON, "md": out_dir / SUMMARY_MD}
    write_csv(files["csv"], frame)
    write_json(files["json"], summary)
    write_text(files["md"], render_localization_md(summary))
    return files


def localize_and_write(
    loaded: LoadedModel,
    items: Iterable[MaskedImage],
    out_dir: str | Path,
    methods: Sequence[str] | None = None,
    *,
    reference: LoadedModel | None = None,
    per_exit: bool = False,
    seed: int = 0,
    head_fusion: str = "mean",
    title: str = "",
    notes: Sequence[str] = (),
) -> dict:
    """`score_localization`, summarised (`summarize_localization`) and written (`write_localization`);
    returns the summary with `files`. DataError when no image could be scored."""
    frame = score_localization(loaded, items, methods, reference=reference, per_exit=per_exit, seed=seed,
                               head_fusion=head_fusion)
    if frame.empty:
        raise DataError(str(out_dir), "no image with a mask could be scored")
    settings = localization_settings(loaded, seed, head_fusion=head_fusion, model=str(loaded.path),
                                     reference=str(reference.path) if reference is not None else None)
    summary = summarize_localization(frame, settings, seed=seed, title=title, notes=list(notes))
    files = write_localization(frame, summary, out_dir)
    summary["files"] = {k: str(v) for k, v in files.items()}
    return summary


def evaluate_localization(
    model_path: str | Path,
    data_dir: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    methods: Sequence[str] | None = None,
    *,
    reference: str | Path | None = None,
    per_exit: bool = False,
    seed: int = 0,
    head_fusion: str = "mean",
    device: str = "cpu",
    limit: int | None = None,
) -> dict:
    """Score the explanations of an artifact on the masked images of `split` of a prepared dataset
    (`prepare --masks`); writes localization.{csv,json,md} to `out_dir` (default RUN/eval/SPLIT).
    `limit`: a random subset (seeded by `seed`) of that many masked images, kept in manifest order."""
    from skindistil.evaluation.evaluate import default_eval_dir
    from skindistil.models.artifact import load_model

    loaded = load_model(model_path, device=device)
    ref = load_model(reference, device=device) if reference is not None else None
    items, unmasked = masked_split(loaded, data_dir, split)
    notes = [f"{unmasked} image(s) of {split} have no mask and are not scored"] if unmasked else []
    if limit is not None and limit < len(items):
        keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
        notes.append(f"a random subset of {limit} of the {len(items)} masked images (seed {seed})")
        items = [items[i] for i in keep]
    out_dir = Path(out_dir) if out_dir else default_eval_dir(model_path, split)
    title = f"Where {loaded.path.parent.name} looks: {split} of {data_dir} ({len(items)} masked images)"
    return localize_and_write(loaded, items, out_dir, methods, reference=ref, per_exit=per_exit, seed=seed,
                              head_fusion=head_fusion, title=title, notes=notes)
