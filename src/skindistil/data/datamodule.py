"""Loading a prepared DATA_DIR for training: a Dataset over the uint8 .npy cache and a LightningDataModule.

Two places to augment (`augment_on`):

- "cpu": DataLoader workers run the per-sample torchvision v2 transforms (`build_train_transform` /
  `build_eval_transform`) and batches arrive as normalised float32.
- "device": workers only load the cached uint8 image and cut a square of its shorter side (random
  along the longer side for training, centred for evaluation): every cached image has the same
  shorter side, so the squares stack without any resizing. `on_after_batch_transfer`, which Lightning
  calls once the batch is on the accelerator, runs `BatchAugment` on the whole batch there (eval mode
  outside training). This keeps CPU work per image to a file read and a slice.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from skindistil.config import PreprocessConfig
from skindistil.data.prepare import default_workers, load_manifest
from skindistil.data.sampling import EpochSampler, class_balanced_sampler, class_counts, resume_position
from skindistil.data.transforms import (
    PAPER_AUGMENT,
    AugmentConfig,
    BatchAugment,
    build_eval_transform,
    build_train_transform,
)
from skindistil.data.vocab import ClassVocab
from skindistil.errors import ConfigError, DataError

AUGMENT_ON = ("cpu", "device")
SAMPLERS = ("none", "balanced")
SQUARE_CROPS = (None, "random", "center")


def default_num_workers() -> int:
    """All usable cores but one (left to the main process), at least 1."""
    return max(1, default_workers() - 1)


def _load_cached_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(path, f"{what} missing; prepare the dataset again") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(path, f"corrupt {what} ({exc}); prepare the dataset again") from None


def load_cached_image(path: Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read one cache file: uint8 [H, W, 3]. DataError naming the file when it is missing, unreadable,
    of the wrong type or shape, or (with `expected_hw`) not the size the manifest records."""
    array = _load_cached_npy(path, "cache file")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DataError(path, f"cache file holds {array.dtype} {array.shape}, expected uint8 [H, W, 3]")
    if expected_hw is not None and array.shape[:2] != tuple(expected_hw):
        raise DataError(path, f"cache file is {array.shape[0]}x{array.shape[1]} (HxW), the manifest says "
                              f"{expected_hw[0]}x{expected_hw[1]}; prepare the dataset again")
    return array


def load_cached_mask(path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    """Read one cached lesion mask (`prepare --masks`): uint8 [H, W], the size of its image. DataError
    naming the file when it is missing, unreadable or of another type or size."""
    mask = _load_cached_npy(path, "cached mask")
    if mask.dtype != np.uint8 or mask.shape != tuple(expected_hw):
        raise DataError(path, f"cached mask holds {mask.dtype} {list(mask.shape)}, expected uint8 {list(expected_hw)} "
                              "(its image's size); prepare the dataset again")
    return mask


def collate_images(batch: list[tuple]) -> list:
    """`default_collate`, except for uint8 images: those are CHW views of contiguous HWC arrays, stacked
    as HWC (a plain memory copy; stacking the CHW views would transpose byte by byte, ~10x slower) and
    returned as a [B, 3, H, W] view in channels-last memory order."""
    if batch[0][0].dtype != torch.uint8:
        return default_collate(batch)
    images = torch.stack([item[0].permute(1, 2, 0) for item in batch]).permute(0, 3, 1, 2)
    return [images, *default_collate([item[1:] for item in batch])]


class CachedImageDataset(Dataset):
    """Rows of a prepared manifest as (image, label), (image, label, row index) with `with_index`,
    (image, label, image_id) with `with_ids`, or (image, label, key) with `with_key`.

    With `seed` set (training), items are keys `epoch * len + index` from an `EpochSampler(tag_epoch=True)`
    and each sample's randomness (square crop, augmentation) is seeded from (seed, epoch, index). The
    key names that augmented sample: stored teacher outputs (`training.teacher_store`) are looked up by it.

    The image is the cached uint8 array as a CHW tensor, optionally cut to a square of its shorter
    side (`square`: "random" along the longer side, or "center"), then passed through `transform`.
    Attributes: `labels` (int64 array), `image_ids` (list), `vocab`.
    """

    def __init__(
        self,
        data_dir: str | Path,
        frame: pd.DataFrame,
        vocab: ClassVocab,
        transform=None,
        *,
        square: str | None = None,
        with_ids: bool = False,
        with_index: bool = False,
        with_key: bool = False,
        seed: int | None = None,
    ):
        if square not in SQUARE_CROPS:
            raise ConfigError(f"square must be one of {SQUARE_CROPS}, got {square!r}")
        self.data_dir = Path(data_dir)
        self.vocab = vocab
        self.transform = transform
        self.square = square
        self.with_ids = with_ids
        self.with_index = with_index
        self.with_key = with_key
        self.seed = seed
        self.labels = frame["label"].to_numpy(dtype=np.int64)
        self.image_ids = frame["image_id"].astype(str).tolist()
        self._files = [self.data_dir / name for name in frame["cache_file"]]
        self._sizes = list(zip(frame["height"].astype(int), frame["width"].astype(int), strict=True))

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        """The cached image `index` as a uint8 tensor [3, H, W] (square-cropped if configured)."""
        array = load_cached_image(self._files[index], self._sizes[index])
        height, width = array.shape[:2]
        side = min(height, width)
        if self.square is not None and height != width:
            room = max(height, width) - side
            start = int(torch.randint(room + 1, ())) if self.square == "random" else room // 2
            array = array[start:start + side] if height > width else array[:, start:start + side]
            array = np.ascontiguousarray(array)
        # A CHW view of the contiguous HWC array; `collate_images` stacks such views without transposing.
        return torch.from_numpy(array).permute(2, 0, 1)

    def __getitem__(self, key: int):
        if self.seed is None:
            index = key
            image = self._load_transformed(index)
        else:
            epoch, index = divmod(int(key), len(self))
            # a private RNG stream per (seed, epoch, sample): the main process's RNG is left untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
                image = self._load_transformed(index)
        label = int(self.labels[index])
        if self.with_ids:
            return image, label, self.image_ids[index]
        if self.with_key:
            return image, label, int(key)
        return (image, label, index) if self.with_index else (image, label)

    def _load_transformed(self, index: int) -> torch.Tensor:
        image = self.load(index)
        return self.transform(image) if self.transform is not None else image


class SkinDataModule(L.LightningDataModule):
    """Train/val/test loaders over a prepared DATA_DIR.

    fold=None: the manifest's train/val/test splits. fold=k (DATA_DIR prepared with k-folds): fold k
    is the validation set, the other folds the training set, test stays the held-out test split.
    sampler="balanced" draws training images class-balanced (with replacement, seeded).
    augment_on: "cpu" or "device" (see the module docstring). Train and test loaders yield
    (images, labels), validation (images, labels, row indices), `predict_dataloader` (test split
    unless told otherwise) (images, labels, image_ids). Training order and augmentation are functions
    of (seed, epoch): reproducible across worker counts and after a resume, mid-epoch too (the
    training position travels in Lightning checkpoints through `state_dict`/`load_state_dict`). With
    `train_keys`, training batches are (images, labels, keys), key = epoch * len(train split) + row:
    the name of each augmented sample (see `CachedImageDataset`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        preprocess: PreprocessConfig | None = None,
        *,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        augment_on: str = "cpu",
        sampler: str = "none",
        fold: int | None = None,
        persistent_workers: bool | None = None,
        pin_memory: bool | None = None,
        augment: AugmentConfig = PAPER_AUGMENT,
        predict_split: str = "test",
        seed: int = 42,
        train_keys: bool = False,
    ):
        super().__init__()
        if augment_on not in AUGMENT_ON:
            raise ConfigError(f"augment_on must be one of {', '.join(AUGMENT_ON)}, got {augment_on!r}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.data_dir = Path(data_dir)
        self.preprocess = preprocess or PreprocessConfig()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.augment_on = augment_on
        self.sampler = sampler
        self.fold = fold
        self.persistent_workers = self.num_workers > 0 if persistent_workers is None else bool(persistent_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.augment = augment
        self.predict_split = predict_split
        self.seed = int(seed)
        self.train_keys = bool(train_keys)
        self.batch_augment = BatchAugment(self.preprocess, augment)
        self.info: dict | None = None
        self._frames: dict[str, pd.DataFrame] = {}
        self._vocab: ClassVocab | None = None
        self._train_sampler: EpochSampler | None = None
        self._resume_at: dict | None = None

    # ------------------------------------------------------------------ data

    def setup(self, stage: str | None = None) -> None:
        if self.info is not None:
            return
        manifest, info = load_manifest(self.data_dir)
        self._vocab = ClassVocab(info["classes"])
        self._frames = self._split_frames(manifest, info)
        if not len(self._frames["train"]):
            raise DataError(self.data_dir, f"no training images{self._fold_note()}")
        if self.preprocess.resize_size > int(info["short_side"]):
            warnings.warn(
                f"{self.data_dir}: images are cached at a shorter side of {info['short_side']} px but the model "
                f"resizes to {self.preprocess.resize_size}: they will be upsampled (prepare with a larger "
                "--short-side for full detail)",
                stacklevel=2,
            )
        self.info = info

    def _split_frames(self, manifest: pd.DataFrame, info: dict) -> dict[str, pd.DataFrame]:
        test = manifest[manifest["split"] == "test"]
        if self.fold is None:
            return {"train": manifest[manifest["split"] == "train"], "val": manifest[manifest["split"] == "val"],
                    "test": test}
        folds = info.get("splits", {}).get("folds")
        if not folds:
            raise ConfigError(f"fold={self.fold} but {self.data_dir} was prepared without k-folds (use --folds)")
        if not 0 <= self.fold < folds:
            raise ConfigError(f"fold must lie in 0..{folds - 1} for {self.data_dir}, got {self.fold}")
        in_pool = manifest["fold"].notna()
        return {"train": manifest[in_pool & (manifest["fold"] != self.fold)],
                "val": manifest[in_pool & (manifest["fold"] == self.fold)], "test": test}

    def _fold_note(self) -> str:
        return f" for fold {self.fold}" if self.fold is not None else ""

    def _frame(self, split: str) -> pd.DataFrame:
        self.setup()
        if split not in self._frames:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(self._frames)}")
        return self._frames[split]

    @property
    def vocab(self) -> ClassVocab:
        self.setup()
        return self._vocab

    @property
    def num_classes(self) -> int:
        return len(self.vocab)

    def labels(self, split: str = "train") -> np.ndarray:
        return self._frame(split)["label"].to_numpy(dtype=np.int64)

    def image_ids(self, split: str) -> list[str]:
        """Image ids of `split` in loader order (eval loaders do not shuffle)."""
        return self._frame(split)["image_id"].astype(str).tolist()

    def class_counts(self, split: str = "train") -> np.ndarray:
        return class_counts(self.labels(split), self.num_classes)

    def fingerprint(self, split: str = "train") -> str:
        """sha256 (hex) of what a split's samples are: per row in loader order its image id, image content
        hash, cache file, label and cached size, with the dataset's classes, cache scale and border crop.
        Equal fingerprints mean the same row index names the same cached image (same split, same fold)."""
        import hashlib

        self.setup()
        columns = ["image_id", "sha256", "cache_file", "label", "height", "width"]
        rows = self._frame(split)[columns].astype(str).to_numpy().tolist()
        head = [self.info["classes"], self.info["short_side"], self.info.get("border_crop")]
        return hashlib.sha256(repr((head, rows)).encode()).hexdigest()

    def dataset(self, split: str, *, train: bool = False, with_ids: bool = False,
                with_index: bool = False, with_key: bool = False) -> CachedImageDataset:
        """Dataset of `split`, with training (`train`: seeded per sample and epoch) or eval preprocessing."""
        if self.augment_on == "device":
            transform, square = None, ("random" if train else "center")
        else:
            transform = build_train_transform(self.preprocess, self.augment) if train else build_eval_transform(self.preprocess)
            square = None
        return CachedImageDataset(self.data_dir, self._frame(split), self.vocab, transform, square=square,
                                  with_ids=with_ids, with_index=with_index, with_key=with_key,
                                  seed=self.seed if train else None)

    # ------------------------------------------------------------------ loaders

    def loader(self, dataset: CachedImageDataset, batch_size: int, **kwargs) -> DataLoader:
        """A DataLoader over `dataset` with this module's workers, pinning and uint8-aware collate.

        Each loader draws its workers' base seed from its own generator, never from torch's global RNG:
        creating an iterator (once per epoch, or once per run with persistent workers) then leaves the
        global RNG, which dropout uses, exactly where a checkpoint recorded it.
        """
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            persistent_workers=self.persistent_workers and workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=collate_images,
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def _shard(self) -> tuple[int, int]:
        """(rank, world size) of the attached trainer; (0, 1) outside one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train", train=True, with_key=self.train_keys)
        rank, world_size = self._shard()
        shard = {"seed": self.seed, "rank": rank, "world_size": world_size, "tag_epoch": True}
        if self.sampler == "balanced":
            sampler = class_balanced_sampler(dataset.labels, self.num_classes, **shard)
        else:
            sampler = EpochSampler(len(dataset), shuffle=True, **shard)
        if self._resume_at is not None:
            sampler.resume_at(self._resume_at["epoch"], self._resume_at["batches"] * self.batch_size)
            self._resume_at = None
        self._train_sampler = sampler
        return self.loader(dataset, self.batch_size, sampler=sampler)

    # ------------------------------------------------------------------ exact resume

    def state_dict(self) -> dict:
        """Saved by Lightning in every checkpoint: {"train_position": {"epoch", "batches"}}, where training
        continues (the rest of the current epoch, or the next one when it is complete).

        Counted from the batches the training loop has consumed, not those the loader has produced
        (workers and Lightning's fetcher prefetch ahead)."""
        trainer = self.trainer
        if self._train_sampler is None or trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch, batches = resume_position(self._train_sampler.epoch, done, trainer.num_training_batches)
        return {"train_position": {"epoch": epoch, "batches": batches}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the training position (Lightning calls this before it builds the training loader):
        the next training loader's sampler starts at that epoch and skips the consumed batches, so
        the resumed run sees the samples, order and augmentation of the uninterrupted run for any
        number of workers. Raises ConfigError when the loader already exists (too late to resume exactly)."""
        position = state.get("train_position")
        if position is None:
            return
        if self._train_sampler is not None:
            raise ConfigError("the training loader was built before the checkpoint was restored: "
                              "this strategy cannot resume exactly")
        self._resume_at = {"epoch": int(position["epoch"]), "batches": int(position["batches"])}

    def val_dataloader(self) -> DataLoader:
        """Validation batches are (images, labels, row indices): under DDP each rank takes a shard, and
        the indices let the metrics count every validation image exactly once."""
        dataset = self.dataset("val", with_index=True)
        rank, world_size = self._shard()
        sampler = EpochSampler(len(dataset), rank=rank, world_size=world_size) if len(dataset) else None
        return self.loader(dataset, self.eval_batch_size, sampler=sampler)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.dataset("test"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.dataset(self.predict_split, with_ids=True), self.eval_batch_size)

    # ------------------------------------------------------------------ device-side augmentation

    def device_transform(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """Turn a uint8 batch of the "device" path into model input (BatchAugment, train or eval mode)."""
        return self.batch_augment.train(train)(images)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, *rest = batch
        if images.dtype != torch.uint8:
            return batch
        training = self.trainer is not None and self.trainer.training
        return type(batch)((self.device_transform(images, training), *rest))
