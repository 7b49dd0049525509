"""skindistil: train a ViT teacher on dermoscopy images, distil it into SkinDistilViT and a family of
lighter models, measure, explain, export and serve them."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load a model artifact (model/ dir, run dir or config.json); see skindistil.models.load_model.

    Imported lazily so that `import skindistil` (and the CLI's parser) stays free of torch.
    """
    from skindistil.models.artifact import load_model as _load_model

    return _load_model(path, device)
