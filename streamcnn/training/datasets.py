"""The training and validation sets a config names, and how batches are dealt to processes.

:func:`build_datasets` turns a :class:`~streamcnn.training.config.DataConfig` into datasets
of ``(image, label)``: a manifest folder (:class:`streamcnn.data.ManifestDataset`), a small
UltraMNIST set generated once into the cache directory (``$STREAMCNN_CACHE`` or
``~/.cache/streamcnn``) and reused, or the in-memory synthetic task.

:class:`ShardedBatchSampler` makes training independent of the number of processes:
every epoch is one permutation seeded by ``(seed, epoch)``, cut into global batches of
``batch_size * world_size`` images, and process ``r`` takes the ``r``-th slice of each.
One process with batch 2B therefore sees exactly the images that two processes with
batch B see together, and a resumed run sees the same order as an uninterrupted one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from streamcnn.data.augment import SLIDE_AUGMENT, AugmentedDataset, check_augment
from streamcnn.data.splits import table_splits
from streamcnn.training.baselines import DownsampledDataset, downsampled_shape
from streamcnn.training.config import TrainConfig, apply_overrides
from streamcnn.training.distributed import DistributedContext
from streamcnn.training.synthetic import SyntheticTextures

__all__ = ["default_cache_dir", "build_datasets", "model_input", "make_loader", "ShardedBatchSampler", "image_size_of",
           "slide_options", "fit_model_to_data", "plan_size", "unwrap_dataset", "split_table",
           "resolve_accumulation", "class_weights", "loss_weights"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("STREAMCNN_CACHE") or Path.home() / ".cache" / "streamcnn")


def _ultramnist(config: TrainConfig, context: DistributedContext) -> tuple[Dataset, Dataset | None]:
    from streamcnn.data import ManifestDataset, generate_ultramnist
    from streamcnn.data.parallel import worker_count
    from streamcnn.data.ultramnist import NUM_CLASSES, generation_seconds
    from streamcnn.data.variants import VARIANTS, write_variant_manifest

    data = config.data
    variant = data.generate_variant
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown data.generate_variant {variant!r}; choose one of {sorted(VARIANTS)} "
                         "(or null for the generator's own label, the sum)")
    # the task's classes, however few images show them
    classes = config.model.num_classes or (VARIANTS[variant][1] if variant else NUM_CLASSES)
    cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    root = cache / f"ultramnist-{data.generate_size}px-seed{data.generate_seed}"
    splits = [("train", data.generate_count)] + ([("test", data.generate_val_count)] if data.generate_val_count else [])
    if context.is_main:  # others wait: one writer per cache folder
        for split, count in splits:
            generate_ultramnist(root / split, count, size=data.generate_size, seed=data.generate_seed, split=split,
                                workers=worker_count(count, generation_seconds(data.generate_size)), progress=config.train.progress)
        if variant is not None:     # a relabelling of the same images, class-balanced
            for split, count in splits:
                _, per_class = write_variant_manifest(root / split, variant)
                if not per_class[0]:
                    raise ValueError(f"the {count} generated {split} images leave no image of some class of the "
                                     f"{variant!r} variant once balanced: generate more (data.generate_count / "
                                     "data.generate_val_count)")
    context.barrier()
    manifest = f"manifest-{variant}.csv" if variant else "manifest.csv"
    sets = [ManifestDataset(root / split, manifest, lazy=bool(data.lazy), num_classes=classes, in_memory=data.in_memory,
                            progress=config.train.progress) for split, _ in splits]
    return sets[0], (sets[1] if len(sets) > 1 else None)


def _manifest(config: TrainConfig) -> tuple[Dataset, Dataset | None]:
    from streamcnn.data import ManifestDataset

    data = config.data
    if data.root is None:
        raise ValueError("data.kind is 'manifest' but no data folder was given: pass --data DIR "
                         "(a folder with manifest.csv listing path,label) or set data.root")
    root, manifest = Path(data.root), data.manifest
    if root.is_file():      # --data slides.csv: the table, its folder the root
        root, manifest = root.parent, root.name
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (pass --data DIR with a manifest.csv, "
                                "or --data TABLE.csv)")
    train = ManifestDataset(root, manifest, **slide_options(config))
    _check_two_classes(train, train.labels, "label column")
    if data.val_manifest is not None:
        val_root = Path(data.val_root) if data.val_root else root
        # the validation labels are numbered with the training set's class names
        options = {**slide_options(config), "classes": train.classes, "num_classes": train.num_classes}
        return train, ManifestDataset(val_root, data.val_manifest, **options)
    default_val = 0.0 if any(s is not None for s in train.splits) or any(f is not None for f in train.folds) else 0.2
    sides, _ = table_splits(train.manifest, train.splits, train.folds, train.labels, train.patients, fold=data.fold,
                            val=default_val if data.val_fraction is None else data.val_fraction,
                            test=data.test_fraction, seed=data.generate_seed)
    picked = {side: [i for i, s in enumerate(sides) if s == side] for side in ("train", "val")}
    if not picked["train"]:
        raise ValueError(f"{train.manifest}: no image is in the training split: mark some rows train")
    _check_two_classes(train, [train.labels[i] for i in picked["train"]], "training split")
    return Subset(train, picked["train"]), (Subset(train, picked["val"]) if picked["val"] else None)


def _check_two_classes(dataset: Any, labels: list[int], where: str) -> None:
    if len(set(labels)) < 2:
        name = dataset.class_names[labels[0]] if labels else "none"
        raise ValueError(f"{dataset.manifest}: only one class: {name} in the {where}; training needs images of at "
                         "least two classes")


def split_table(train: Dataset, val: Dataset | None) -> tuple[list[str], list[str]] | None:
    """(ids, ``train``/``val``/``test``) of every image of the table(s) behind ``train`` and ``val``
    (what ``split.csv`` records; images in neither were held out for testing); None without a table."""
    base, indices = unwrap_dataset(train)
    ids = getattr(base, "ids", None)
    if ids is None:
        return None
    sides = ["test"] * len(ids)
    for i in indices if indices is not None else range(len(ids)):
        sides[i] = "train"
    if val is None:
        return list(ids), sides
    val_base, val_indices = unwrap_dataset(val)
    if val_base is base:
        for i in val_indices if val_indices is not None else range(len(ids)):
            sides[i] = "val"
        return list(ids), sides
    val_ids = list(getattr(val_base, "ids", []))
    chosen = val_indices if val_indices is not None else range(len(val_ids))
    return list(ids) + [val_ids[i] for i in chosen], sides + ["val"] * len(chosen)


def slide_options(config: TrainConfig) -> dict[str, Any]:
    """The :class:`~streamcnn.data.ManifestDataset` options a config sets (level, mpp, tissue, ...)."""
    data = config.data
    return {"lazy": data.lazy is not False, "num_classes": config.model.num_classes, "classes": data.classes,
            "level": data.level, "mpp": data.mpp, "tissue": data.tissue, "mask_suffix": data.mask_suffix,
            "on_error": data.on_error, "in_memory": data.in_memory, "progress": config.train.progress}


def _hold_out(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    if fraction <= 0:
        return train, None
    n = len(train)  # type: ignore[arg-type]
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"data.val_fraction={fraction} leaves no training images out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train, sorted(order[n_val:])), Subset(train, sorted(order[:n_val]))


def build_datasets(config: TrainConfig, context: DistributedContext) -> tuple[Dataset, Dataset | None]:
    """(train, validation or None) as the config says, downsampled for the baseline mode."""
    data = config.data
    if data.kind == "synthetic":
        train: Dataset = SyntheticTextures(data.synthetic_count, data.synthetic_size, seed=data.generate_seed)
        val: Dataset | None = SyntheticTextures(max(data.synthetic_count // 4, 4), data.synthetic_size,
                                                seed=data.generate_seed + 1)
    elif data.kind == "ultramnist":
        train, val = _ultramnist(config, context)
    else:
        train, val = _manifest(config)
    if val is None and data.kind != "manifest":
        train, val = _hold_out(train, data.val_fraction or 0.0, data.generate_seed)
    augment = (SLIDE_AUGMENT if data.kind == "manifest" else []) if data.augment is None else data.augment
    if augment:
        train = AugmentedDataset(train, check_augment(augment, getattr(unwrap_dataset(train)[0], "channels", None)),
                                 config.train.seed)
    if config.model.mode != "downsample":
        _check_full_size_batches(train, config, "rot90" in augment)
    return model_input(train, config), (model_input(val, config) if val is not None else None)


def resolve_accumulation(config: TrainConfig, train: Dataset) -> tuple[TrainConfig, str | None]:
    """``config`` with ``train.accumulate`` from ``train.effective_batch`` (when set), and the line saying so."""
    target = config.train.effective_batch
    if target is None:
        return config, None
    images = len(train)  # type: ignore[arg-type]
    batch = config.train.batch_size
    accumulate = max(1, min(target, images) // batch)

    line = (f"{batch} image(s) per step, gradients accumulated over {accumulate} step(s): an effective batch of "
            f"{batch * accumulate} = min({target}, {images} training images) (set train.batch_size and "
            "train.accumulate to choose)")
    return apply_overrides(config, [("train.accumulate", accumulate)]), line


def model_input(dataset: Dataset, config: TrainConfig) -> Dataset:
    """``dataset`` as the model reads it: downsampled to ``model.input_size`` in the baseline mode."""
    if config.model.mode == "downsample":
        _check_batches_share_a_shape(dataset, config)
        return DownsampledDataset(dataset, config.model.input_size, config.model.input_fit)
    return dataset


def _check_full_size_batches(dataset: Dataset, config: TrainConfig, rotated: bool) -> None:
    """Full-resolution images share a batch only when they share a size (quarter turns swap H and W)."""
    base, indices = unwrap_dataset(dataset)
    entries = getattr(base, "entries", None)
    if config.train.batch_size == 1 or entries is None:
        return
    sizes: dict[tuple[int, int], Any] = {}
    for i in indices if indices is not None else range(len(entries)):
        h, w = entries[i].size
        for size in ((h, w), (w, h)) if rotated else ((h, w),):
            sizes.setdefault(size, entries[i].path)
    if len(sizes) > 1:
        examples = "; ".join(f"{path}: {h} x {w}" for (h, w), path in list(sizes.items())[:2])
        raise ValueError(f"the training images of {getattr(base, 'manifest', 'the data')} come in {len(sizes)} sizes"
                         f"{', quarter turns (data.augment rot90) included' if rotated else ''} ({examples}) and cannot "
                         f"share a batch of {config.train.batch_size}: set train.batch_size=1 with train.accumulate")


def _check_batches_share_a_shape(dataset: Dataset, config: TrainConfig) -> None:
    """``input_fit=long_side`` keeps aspect ratios: with a batch of more than one image, every image
    must come out the same shape (read from the headers before anything is trained)."""
    m = config.model
    if m.input_fit != "long_side" or config.train.batch_size == 1:
        return
    base, indices = unwrap_dataset(dataset)
    entries = getattr(base, "entries", None)
    if entries is None:
        return
    shapes: dict[tuple[int, int], Any] = {}
    for i in indices if indices is not None else range(len(entries)):
        shapes.setdefault(downsampled_shape(*entries[i].size, m.input_size, "long_side"), entries[i].path)
    if len(shapes) > 1:
        examples = "; ".join(f"{path}: {h} x {w}" for (h, w), path in list(shapes.items())[:2])
        raise ValueError(f"model.input_fit=long_side keeps each image's aspect ratio, and the images of "
                         f"{getattr(base, 'manifest', 'the data')} come out in {len(shapes)} shapes ({examples}), "
                         f"which cannot share a batch of {config.train.batch_size}: set train.batch_size=1 or "
                         "model.input_fit=pad")


def image_size_of(image: Any) -> tuple[int, int]:
    """(H, W) of a reader (``.shape`` = (C, H, W)) or a (C, H, W) tensor."""
    shape = tuple(image.shape)
    if len(shape) != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {shape}")
    return int(shape[1]), int(shape[2])


class ShardedBatchSampler(Sampler[list[int]]):
    """This process's batches for one epoch; see the module docstring.

    Training (``shuffle=True``): incomplete global batches at the end are dropped, so every
    process runs the same number of steps. Evaluation (``shuffle=False``): every image once,
    process ``r`` taking images ``r, r + world_size, ...``.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, *, shuffle: bool = True,
                 seed: int = 0, weights: list[float] | None = None, on_epoch: Callable[[int], None] | None = None):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.shuffle, self.seed, self.epoch, self.start = shuffle, seed, 0, 0
        # weights: an epoch draws ``size`` images with replacement, each with this weight (data.balance)
        self.weights, self.on_epoch = weights, on_epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Deal ``epoch``'s batches, leaving out the first ``start`` (done before a mid-epoch checkpoint)."""
        self.epoch, self.start = epoch, start
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            mine = list(range(self.rank, self.size, self.world_size))
            yield from (mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size))
            return
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist() if self.weights is None else \
            torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), self.size, replacement=True,
                              generator=generator).tolist()
        step = self.batch_size * self.world_size
        for start in range(self.start * step, self.size - step + 1, step):
            offset = start + self.rank * self.batch_size
            yield order[offset:offset + self.batch_size]

    def __len__(self) -> int:
        if not self.shuffle:
            mine = len(range(self.rank, self.size, self.world_size))
            return -(-mine // self.batch_size)
        return self.size // (self.batch_size * self.world_size)


def make_loader(dataset: Dataset, config: TrainConfig, context: DistributedContext, *, train: bool) -> DataLoader:
    """This process's batches of ``dataset``: shuffled global batches for training, a shard for evaluation."""
    from streamcnn.data import collate_images

    augmented = _augmented(dataset) if train else None
    weights = class_weights(dataset) if train and config.data.balance == "class" else None
    sampler = ShardedBatchSampler(len(dataset), config.train.batch_size // context.shares, context.rank,  # type: ignore[arg-type]
                                  context.world_size, shuffle=train, seed=config.train.seed, weights=weights,
                                  on_epoch=None if augmented is None else lambda epoch: setattr(augmented, "epoch", epoch))
    # Its own generator: making an iterator must not draw from the global RNG, or a run resumed
    # mid-epoch (which makes one more iterator) would see different dropout than an uninterrupted one.
    # Workers of augmented data start afresh each epoch, so they see its epoch.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_images, num_workers=config.train.workers,
                      persistent_workers=config.train.workers > 0 and augmented is None,
                      generator=torch.Generator().manual_seed(config.train.seed))


def _augmented(dataset: Dataset) -> AugmentedDataset | None:
    while not isinstance(dataset, AugmentedDataset):
        if not isinstance(dataset, (Subset, DownsampledDataset)):
            return None
        dataset = dataset.dataset
    return dataset


def _labels_of(dataset: Dataset) -> list[int]:
    base, indices = unwrap_dataset(dataset)
    if getattr(base, "labels", None) is None:
        raise ValueError("data.balance needs a table with labels (data.kind=manifest)")
    return [base.labels[i] for i in (indices if indices is not None else range(len(base.labels)))]


def class_weights(dataset: Dataset) -> list[float]:
    """Per image, one over the number of images of its class: every class is drawn equally often."""
    mine = _labels_of(dataset)
    counts = {label: mine.count(label) for label in set(mine)}
    return [1.0 / counts[label] for label in mine]


def loss_weights(dataset: Dataset, config: TrainConfig) -> torch.Tensor:
    """Per class, ``images / (classes * images of the class)`` (1 for a class without images): the
    class-weighted loss of ``data.balance=loss``, whose mean weight over the training images is 1."""
    mine = _labels_of(dataset)
    classes = config.model.num_classes or max(mine) + 1
    counts = torch.bincount(torch.tensor(mine), minlength=classes).double()
    return torch.where(counts > 0, len(mine) / (int((counts > 0).sum()) * counts.clamp_min(1)), torch.ones_like(counts))


def unwrap_dataset(dataset: Dataset) -> tuple[Dataset, list[int] | None]:
    """The dataset under Subset/DownsampledDataset wrappers, and the indices the wrappers keep."""
    indices = None
    while True:
        if isinstance(dataset, Subset):
            indices = [dataset.indices[i] for i in indices] if indices is not None else list(dataset.indices)
            dataset = dataset.dataset
        elif isinstance(dataset, (DownsampledDataset, AugmentedDataset)):
            dataset = dataset.dataset
        else:
            return dataset, indices


def fit_model_to_data(config: TrainConfig, train: Dataset) -> tuple[TrainConfig, tuple[int, int], str]:
    """``config`` with ``model.in_channels``, ``model.num_classes`` and ``data.classes`` from the data
    where the config leaves them unset (a value the config fixes that the data contradicts is an
    error), and the :func:`plan_size` of ``train``. Reads at most one image (datasets without headers)."""
    base, _ = unwrap_dataset(train)
    probe: list = []

    def first() -> Any:
        if not probe:
            probe.append(train[0][0])
        return probe[0]

    channels = getattr(base, "channels", None)
    if channels is None:
        channels = config.model.in_channels or int(first().shape[0])
    classes = getattr(base, "classes", None)
    needed = getattr(base, "num_classes", None)
    m, where = config.model, getattr(base, "manifest", "the training data")
    if m.in_channels is not None and m.in_channels != channels:
        raise ValueError(f"model.in_channels is {m.in_channels} but the images of {where} have {channels} "
                         "channels: remove model.in_channels (it is then taken from the data) or set it to "
                         f"{channels}")
    if m.num_classes is not None and needed is not None and m.num_classes < needed:
        raise ValueError(f"model.num_classes is {m.num_classes} but the labels of {where} need {needed}"
                         + (f" (classes {classes})" if classes else "") + ": remove model.num_classes "
                         "(it is then taken from the data)")
    overrides: list[tuple[str, Any]] = [("model.in_channels", channels),
                                        ("model.num_classes", m.num_classes or needed)]
    if classes and config.data.classes is None:
        overrides.append(("data.classes", list(classes)))

    config = apply_overrides(config, overrides)
    return (config, *plan_size(train, config, first))


def plan_size(dataset: Dataset, config: TrainConfig, first: Any = None) -> tuple[tuple[int, int], str]:
    """(H, W) to plan memory for, and which image sets it: the largest image of the table as
    read (level, tissue crop; from headers; a split's training part plans for the whole table), or ``input_size`` in the downsampling baseline.
    ``first``: a function returning the dataset's first image, for datasets without headers."""
    if config.model.mode == "downsample":
        size = config.model.input_size
        return (size, size), f"model.input_size={size} (downsample mode, long side)"
    base, _ = unwrap_dataset(dataset)
    entries = getattr(base, "entries", None)
    if entries is None:
        size = image_size_of(first() if first is not None else dataset[0][0])
        return size, f"the first image ({size[0]} x {size[1]}; this dataset has no headers to compare)"
    chosen = range(len(entries))    # a split's training part: its validated images too run on this plan
    best = max(chosen, key=lambda i: (entries[i].size[0] * entries[i].size[1], entries[i].size))
    h, w = entries[best].size
    return (h, w), f"{entries[best].path} ({h} x {w} px at level {entries[best].level}), the largest of {len(chosen)}"
