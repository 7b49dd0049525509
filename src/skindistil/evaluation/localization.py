"""Where a model looks, scored against a lesion mask: pure functions over arrays.

Every function takes a relevance map `heat` (float, non-negative, [H, W]) and a lesion mask `mask`
(bool, [H, W], True = lesion) at the SAME resolution: the model's input (S x S pixels), the map
upsampled to it and the mask cropped and resized like the input (`skindistil.inference.localization`).

Definitions (p = heat / heat.sum(), the map as a distribution of relevance mass over pixels):

- lesion share a = mean(mask): the lesion's share of the image.
- mass in lesion m = sum(p[mask]): the share of relevance mass inside the lesion.
- mass ratio m / a: 1.0 for a uniform map, > 1 when the map favours the lesion (undefined when a = 0).
- pointing game (Zhang et al., 2016, "Top-down neural attention by excitation backprop"): a hit when
  the map's maximum lies inside the lesion or within `tolerance_px` pixels of it (Euclidean distance
  to the nearest lesion pixel). Pixels tied at the maximum (within 1e-6 of it, relative) share the
  vote: the hit is the fraction of them that land, so a flat map scores the tolerance-grown lesion's
  share instead of whatever pixel an argmax would happen to pick first.
- pixel AUC: ROC AUC of the map as a score for classifying each pixel as lesion
  (`sklearn.metrics.roc_auc_score`); 0.5 for an uninformative map, undefined when the mask is all
  lesion or all background.

An all-zero map (no positive relevance) scores NaN on every metric and is counted as such; so is an
undefined metric. Summaries are means over images with 95% percentile-bootstrap intervals
(`scipy.stats.bootstrap`, seeded), NaNs left out and counted.

Baselines scored by the same rules: `random_map` (i.i.d. uniform pixels, seeded) and `centre_prior`
(an isotropic Gaussian at the image centre, sigma = CENTRE_SIGMA_FRACTION of the side).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from skindistil.markdown import markdown_table

# Pointing-game tolerance: 15 px at a 224 px input (Zhang et al.), scaled with the input side.
POINTING_TOLERANCE_FRACTION = 15 / 224
# Centre prior: a Gaussian with sigma a quarter of the side (about 56 px at 224 px).
CENTRE_SIGMA_FRACTION = 0.25
# Ties at the map's maximum: values within this fraction of the maximum count as the maximum.
_TIE_RTOL = 1e-6
METRICS = ("mass_in_lesion", "mass_ratio", "pointing_hit", "pixel_auc")
METRIC_TITLES = {
    "mass_in_lesion": "mass in lesion",
    "mass_ratio": "mass ratio (uniform = 1)",
    "pointing_hit": "pointing game",
    "pixel_auc": "pixel AUC",
}


def pointing_tolerance(side: int) -> float:
    """The pointing-game tolerance in pixels for an input of `side` pixels (15 px at 224)."""
    return POINTING_TOLERANCE_FRACTION * side


def _check(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heat = np.asarray(heat, dtype=np.float64)
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ValueError(f"mask must be boolean (lesion = True), got {mask.dtype}")
    if heat.shape != mask.shape or heat.ndim != 2:
        raise ValueError(f"map {heat.shape} and mask {mask.shape} must be 2-D arrays of one shape")
    if not np.isfinite(heat).all() or (heat < 0).any():
        raise ValueError("the map must be finite and non-negative")
    return heat, mask


def lesion_share(mask: np.ndarray) -> float:
    """Share of the image's pixels inside the lesion, in [0, 1]."""
    return float(np.asarray(mask, dtype=bool).mean())


def mass_in_lesion(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's relevance mass inside the lesion, in [0, 1]; NaN for an all-zero map."""
    heat, mask = _check(heat, mask)
    total = heat.sum()
    return float(heat[mask].sum() / total) if total > 0 else math.nan


def mass_ratio(heat: np.ndarray, mask: np.ndarray) -> float:
    """mass_in_lesion / lesion_share: 1.0 for a uniform map; NaN without lesion pixels or map mass."""
    share = lesion_share(mask)
    return mass_in_lesion(heat, mask) / share if share > 0 else math.nan


def pointing_hit(heat: np.ndarray, mask: np.ndarray, tolerance_px: float) -> float:
    """Pointing game for one image: the share of the map's maximal pixels within `tolerance_px` of
    the lesion (1.0 or 0.0 for a single maximum); NaN without lesion pixels or map mass."""
    from scipy import ndimage

    heat, mask = _check(heat, mask)
    top = heat.max()
    if not mask.any() or top <= 0:
        return math.nan
    maxima = heat >= top * (1 - _TIE_RTOL)
    reach = ndimage.distance_transform_edt(~mask) <= tolerance_px
    return float(reach[maxima].mean())


def pixel_auc(heat: np.ndarray, mask: np.ndarray) -> float:
    """ROC AUC of the map as a lesion-pixel score; NaN when the mask has one class only or the map
    has no mass."""
    from sklearn.metrics import roc_auc_score

    heat, mask = _check(heat, mask)
    if mask.all() or not mask.any() or heat.max() <= 0:
        return math.nan
    return float(roc_auc_score(mask.ravel(), heat.ravel()))


def localization_scores(heat: np.ndarray, mask: np.ndarray, tolerance_px: float) -> dict[str, float]:
    """All four scores of one map against one mask, plus the lesion share (see the module docstring)."""
    return {
        "lesion_share": lesion_share(mask),
        "mass_in_lesion": mass_in_lesion(heat, mask),
        "mass_ratio": mass_ratio(heat, mask),
        "pointing_hit": pointing_hit(heat, mask, tolerance_px),
        "pixel_auc": pixel_auc(heat, mask),
    }


def map_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps of one shape over pixels; NaN when either map is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps of different sizes: {a.size} and {b.size} pixels")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


# -------------------------------------------------------------------------------------- baselines


def random_map(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An uninformative map: i.i.d. uniform [0, 1) pixels drawn from `rng`."""
    return rng.random(shape)


def centre_prior(shape: tuple[int, int], sigma_fraction: float = CENTRE_SIGMA_FRACTION) -> np.ndarray:
    """A Gaussian at the image centre, exp(-d^2 / (2 sigma^2)) with sigma = sigma_fraction * the
    shorter side, d the distance to the centre in pixels (peak 1.0)."""
    height, width = shape
    sigma = sigma_fraction * min(height, width)
    ys = np.arange(height) - (height - 1) / 2
    xs = np.arange(width) - (width - 1) / 2
    return np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))


# -------------------------------------------------------------------------------------- summaries


def mean_interval(values: Sequence[float], *, seed: int = 0, n_resamples: int = 2000) -> dict[str, float]:
    """{mean, low, high, n, undefined}: the mean of the finite values with a 95% percentile-bootstrap
    interval over them (seeded); NaN values are left out and counted in `undefined`. The interval is
    NaN below two values, and collapses to the mean when all values are equal."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    out = {"mean": math.nan, "low": math.nan, "high": math.nan, "n": int(finite.size),
           "undefined": int(values.size - finite.size)}
    if finite.size == 0:
        return out
    out["mean"] = float(finite.mean())
    if finite.size >= 2:
        out["low"], out["high"] = _bootstrap((finite,), _mean_statistic, seed, n_resamples, paired=False)
    return out


def difference_interval(a: Sequence[float], b: Sequence[float], *, seed: int = 0,
                        n_resamples: int = 2000) -> dict[str, float]:
    """mean(a) - mean(b) for two independent groups of images, with a 95% percentile-bootstrap
    interval (each group resampled on its own); finite values only. NaN when a group has < 2 values."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out = {"difference": math.nan, "low": math.nan, "high": math.nan, "n_a": int(a.size), "n_b": int(b.size)}
    if a.size == 0 or b.size == 0:
        return out
    out["difference"] = float(a.mean() - b.mean())
    if a.size >= 2 and b.size >= 2:
        out["low"], out["high"] = _bootstrap((a, b), _difference_statistic, seed, n_resamples, paired=False)
    return out


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], *, seed: int = 0,
                   n_resamples: int = 2000) -> dict[str, float]:
    """mean(numerator) / mean(denominator) over the same images (pairs where both are finite), with a
    95% paired percentile-bootstrap interval (images resampled together). NaN for a zero denominator."""
    x = np.asarray(numerator, dtype=np.float64)
    y = np.asarray(denominator, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values of different lengths: {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {"ratio": math.nan, "low": math.nan, "high": math.nan, "n": int(x.size)}
    if x.size == 0 or y.mean() <= 0:
        return out
    out["ratio"] = float(x.mean() / y.mean())
    if x.size >= 2:
        out["low"], out["high"] = _bootstrap((x, y), _ratio_statistic, seed, n_resamples, paired=True)
    return out


def _mean_statistic(x, axis=-1):
    return np.mean(x, axis=axis)


def _difference_statistic(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _ratio_statistic(x, y, axis=-1):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.mean(x, axis=axis) / np.mean(y, axis=axis)


def _bootstrap(data, statistic, seed: int, n_resamples: int, paired: bool) -> tuple[float, float]:
    from scipy.stats import bootstrap

    if all(np.ptp(d) == 0 for d in data):
        value = float(statistic(*data))  # every resample gives the same value
        return value, value
    result = bootstrap(data, statistic, n_resamples=n_resamples, vectorized=True, paired=paired,
                       method="percentile", confidence_level=0.95, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


# ------------------------------------------------------------------------------------- the report

BASELINE_METHODS = ("random", "centre-prior")


def _groups(frame):
    """(depth or None, method, its rows) in order of appearance, the baselines last."""
    import pandas as pd

    depths = [None if pd.isna(d) else int(d) for d in frame["depth"]]
    keys = list(dict.fromkeys(zip(depths, frame["method"], strict=True)))
    keys = [k for k in keys if k[1] not in BASELINE_METHODS] + [k for k in keys if k[1] in BASELINE_METHODS]
    methods = frame["method"].to_numpy()
    for depth, method in keys:
        keep = np.array([d == depth for d in depths], dtype=bool) & (methods == method)
        yield depth, method, frame[keep]


def summarize_localization(frame, settings: dict, *, seed: int = 0, title: str = "",
                           notes: list[str] | None = None) -> dict:
    """The summary of a per-image frame from `skindistil.inference.localization.score_localization`:

    - `methods`: per (depth, method), each metric's mean with a 95% interval (`mean_interval`), and
      `beats_baselines`: per metric, whether the interval's low end is above the high end of both
      baselines' intervals (a conservative rule: a method is informative only where this holds);
    - `correct_vs_wrong` (when labels are known): mass in lesion for correct and wrong predictions
      and their difference (`difference_interval`); the baselines' rows show how much of a
      difference lesion size alone makes;
    - `reference` (with a reference model): map correlation (mean, interval), mass-in-lesion
      retention = mean(mass in lesion) / mean(reference's) (`ratio_interval`), each also for correct
      and wrong predictions.
    """
    import pandas as pd

    images = frame.drop_duplicates("image_id")
    summary = {
        "title": title,
        "settings": settings,
        "notes": list(notes or []),
        "images": int(len(images)),
        "lesion_share": mean_interval(images["lesion_share"], seed=seed),
        "methods": [],
        "correct_vs_wrong": [],
        "reference": [],
    }
    groups = list(_groups(frame))
    for depth, method, rows in groups:
        summary["methods"].append({"depth": depth, "method": method, "n": int(len(rows)),
                                   **{metric: mean_interval(rows[metric], seed=seed) for metric in METRICS}})
    baselines = [entry for entry in summary["methods"] if entry["method"] in BASELINE_METHODS]
    for entry in summary["methods"]:
        entry["beats_baselines"] = {
            metric: entry["method"] not in BASELINE_METHODS and bool(baselines) and all(
                entry[metric]["low"] > b[metric]["high"] for b in baselines)
            for metric in METRICS
        }
    labelled = frame["correct"].notna().any()
    for depth, method, rows in groups:
        if labelled:
            correct = rows["correct"].astype("boolean").fillna(False).to_numpy(dtype=bool)
            wrong = rows["correct"].notna().to_numpy() & ~correct
            mass = rows["mass_in_lesion"].to_numpy(dtype=float)
            summary["correct_vs_wrong"].append({
                "depth": depth, "method": method,
                "correct": mean_interval(mass[correct], seed=seed),
                "wrong": mean_interval(mass[wrong], seed=seed),
                "difference": difference_interval(mass[correct], mass[wrong], seed=seed),
            })
        if "map_correlation" in frame.columns and rows["reference_mass_in_lesion"].notna().any():
            entry = {"depth": depth, "method": method}
            parts = {"all": pd.Series(True, index=rows.index)}
            if labelled:
                parts["correct"] = rows["correct"] == True  # noqa: E712 (a nullable column)
                parts["wrong"] = rows["correct"] == False  # noqa: E712
            for name, keep in parts.items():
                part = rows[keep.fillna(False).astype(bool)]
                suffix = "" if name == "all" else f"_{name}"
                entry[f"map_correlation{suffix}"] = mean_interval(part["map_correlation"], seed=seed)
                entry[f"retention{suffix}"] = ratio_interval(part["mass_in_lesion"], part["reference_mass_in_lesion"],
                                                             seed=seed)
            summary["reference"].append(entry)
    return summary


def format_interval(stats: dict, key: str = "mean") -> str:
    """`value [low, high]` to 3 decimals (`value` alone without an interval, `n/a` when undefined)."""
    value = stats.get(key, math.nan)
    if value is None or not math.isfinite(value):
        return "n/a"
    low, high = stats.get("low"), stats.get("high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _label(entry: dict) -> str:
    return entry["method"] if entry["depth"] is None else f"{entry['method']} @ depth {entry['depth']}"


def render_localization_md(summary: dict) -> str:
    """The summary as Markdown: the scores table (with the baselines), correct vs wrong, reference."""
    s = summary["settings"]
    lines = [f"# {summary['title'] or 'Where the model looks'}", ""]
    lines.append(
        f"{summary['images']} images with a lesion mask; lesion share of the input "
        f"{format_interval(summary['lesion_share'])}. Input {s['input_size']} px; mask = pixels >= {s['mask_threshold']} "
        f"after the input's crop and resize; maps upsampled bilinearly to the input; pointing-game tolerance "
        f"{s['pointing_tolerance_px']} px (15 px at 224); centre prior: Gaussian, sigma {s['centre_prior_sigma_px']} "
        f"px; class-specific methods explain the predicted class. Values: mean [95% bootstrap interval over "
        f"images]; **bold**: above both baselines (interval low end above their interval high ends)."
    )
    rows = []
    for entry in summary["methods"]:
        cells = []
        for metric in METRICS:
            text = format_interval(entry[metric])
            cells.append(f"**{text}**" if entry["beats_baselines"][metric] else text)
        rows.append([_label(entry), str(entry["n"]), *cells])
    lines += ["", markdown_table(["method", "images", "mass in lesion", "mass ratio (uniform = 1)", "pointing game",
                                  "pixel AUC"], rows, align=[None, *["right"] * 5])]
    undefined = [f"{_label(e)}: {m} {e[m]['undefined']}" for e in summary["methods"] for m in METRICS
                 if e[m]["undefined"]]
    if undefined:
        lines += ["", "Undefined scores left out (all-zero map, mask all lesion or all background): "
                  + "; ".join(undefined) + "."]
    if summary["correct_vs_wrong"]:
        rows = [[_label(entry), f"{format_interval(entry['correct'])} (n={entry['correct']['n']})",
                 f"{format_interval(entry['wrong'])} (n={entry['wrong']['n']})",
                 format_interval(entry["difference"], "difference")] for entry in summary["correct_vs_wrong"]]
        lines += ["", "## Mass in lesion: correct vs wrong predictions", "",
                  markdown_table(["method", "correct", "wrong", "difference (correct - wrong)"], rows,
                                 align=[None, "right", "right", "right"])]
        lines += ["", "The baselines' differences come from lesion size and position alone, not from the model."]
    if summary["reference"]:
        rows = []
        for entry in summary["reference"]:
            split_corr = " / ".join(format_interval(entry.get(f"map_correlation_{k}", {})) for k in ("correct", "wrong"))
            split_ret = " / ".join(format_interval(entry.get(f"retention_{k}", {}), "ratio") for k in ("correct", "wrong"))
            rows.append([_label(entry), format_interval(entry["map_correlation"]),
                         format_interval(entry["retention"], "ratio"), split_corr, split_ret])
        lines += ["", f"## Against the reference model ({s.get('reference')})", "",
                  markdown_table(["method", "map correlation", "mass-in-lesion retention", "correlation: correct / wrong",
                                  "retention: correct / wrong"], rows, align=[None, *["right"] * 4])]
        lines += ["", "Retention = mean mass in lesion / the reference's on the same images (1 = as much)."]
    for note in summary["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
