"""Publishing an artifact on the Hugging Face Hub, where timm reads it as it is.

An artifact's config.json is already timm's hub format (see `models.artifact`), so the folder itself
is the repository: `push_model` adds the hub's model card (README.md, with the metadata that lists it
as a timm image classifier) and uploads the artifact's files through huggingface_hub. Offline, it
fails at once with a clear message, and the folder is left ready to upload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skindistil.errors import ModelError
from skindistil.models.artifact import (
    CARD_FILE,
    CONFIG_FILE,
    EXITS_FILE,
    FORMAT_VERSION,
    METRICS_FILE,
    WEIGHTS_FILE,
    load_model,
    model_card,
    resolve_model_dir,
)

HUB_README = "README.md"
UPLOADED = (CONFIG_FILE, WEIGHTS_FILE, EXITS_FILE, METRICS_FILE, CARD_FILE, HUB_README)


def hub_readme(config: dict, metrics: dict, repo_id: str) -> str:
    """README.md for the hub: YAML metadata (timm library, image classification, the class labels)
    then the artifact's model card and how to load it with timm and skindistil."""
    import yaml

    meta = {"library_name": "timm", "pipeline_tag": "image-classification",
            "tags": ["image-classification", "timm", "skindistil", "dermatology"]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", model_card(config, metrics).strip(), "",
             "## Use", "", "```python", "import timm", "",
             f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()',
             "config = timm.data.resolve_data_config(model=model)",
             "transform = timm.data.create_transform(**config)",
             "```", ""]
    if config.get("preprocess", {}).get("border_crop"):
        lines += ["timm's transform has no dermoscope black-border crop; skindistil's loader applies it "
                  "(`skindistil predict --model DIR` on a download of this repository).", ""]
    if config.get("kind") == "depth_vit":
        lines += [f"timm builds the last exit (the full-depth ViT); the other exits' heads are in {EXITS_FILE}, "
                  "which only skindistil reads.", ""]
    return "\n".join(lines)


def prepare_for_hub(model_dir: str | Path, repo_id: str) -> tuple[Path, list[str]]:
    """Check that `model_dir` loads and is in timm's hub format (format 2), write its README.md, and
    return (the folder, the files to upload). ModelError naming the folder otherwise."""
    model_dir = resolve_model_dir(model_dir)
    loaded = load_model(model_dir)
    if loaded.config.get("format") != FORMAT_VERSION:
        raise ModelError(
            f"{model_dir}: artifact format {loaded.config.get('format')} predates timm's hub format, so timm and the "
            "hub cannot read it; rewrite it first: python -c \"from skindistil.models.artifact import upgrade_artifact; "
            f"upgrade_artifact('{model_dir}')\""
        )
    readme = model_dir / HUB_README
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(hub_readme(loaded.config, loaded.metrics, repo_id))
    tmp.replace(readme)
    return model_dir, [name for name in UPLOADED if (model_dir / name).is_file()]


def push_model(model_dir: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
               api: Any = None) -> dict:
    """Upload the artifact `model_dir` to the hub repository `repo_id` (created if needed).

    Returns {"repo", "folder", "files", "url" (None for a dry run)}. dry_run: prepare the folder
    only. api: a huggingface_hub.HfApi (default: one for the configured endpoint and token). Raises
    ModelError when the hub is unreachable or offline (HF_HUB_OFFLINE), or refuses the upload
    (authentication, permissions): the message says that the folder is ready and how to upload it.
    """
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelError(f"--repo {repo_id!r}: expected a hub repository id OWNER/NAME")
    folder, files = prepare_for_hub(model_dir, repo_id)
    result = {"repo": repo_id, "folder": str(folder), "files": files, "url": None}
    if dry_run:
        return result
    ready = (f"{folder} is ready to upload: on a connected machine run `skindistil push --model {folder} "
             f"--repo {repo_id}` (or `hf upload {repo_id} {folder} .`)")
    if api is None:
        from huggingface_hub import HfApi, constants

        from skindistil.models.teacher import hub_reachable

        if not hub_reachable():
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} is unreachable"
            raise ModelError(f"cannot push to the Hugging Face Hub ({why}); {ready}")
        api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 allow_patterns=files, commit_message=f"skindistil: upload {folder.name}")
    except (OSError, ValueError) as exc:  # huggingface_hub's HTTP, auth and connection errors
        raise ModelError(f"the hub refused the upload to {repo_id} ({type(exc).__name__}: {exc}); log in with "
                         f"`hf auth login` or set HF_TOKEN if needed; {ready}") from None
    result["url"] = str(getattr(info, "commit_url", None) or info)
    return result
