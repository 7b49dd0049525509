"""skindistil: train a ViT teacher on dermoscopy images, distill it into SkinDistilViT and a family of
lighter models, measure, explain, export and serve them."""

from skindistil.version import __version__

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu"):
    """Load a model artifact (model/ dir, run dir or config.json); see skindistil.models.load_model.

    Imported lazily so that `import skindistil` (and the CLI's parser) stays free of torch.
    """
    from skindistil.models.artifact import load_model as _load_model

    return _load_model(path, device)
