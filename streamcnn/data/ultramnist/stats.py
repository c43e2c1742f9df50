"""Statistics of UltraMNIST layouts (digit sizes, counts, values, labels), computed without pixels."""
from __future__ import annotations

import numpy as np

from streamcnn.data.digits import load_digit_bank
from streamcnn.data.ultramnist.layout import NUM_CLASSES, REFERENCE_SIZE, sample_layout

__all__ = ["layout_statistics"]


def layout_statistics(count: int, size: int = REFERENCE_SIZE, seed: int = 0, split: str = "train",
                      progress: bool = False) -> dict:
    """Statistics of ``count`` layouts (no pixels): the figures the spec quotes for the reference."""
    from tqdm.auto import tqdm

    bank_sizes = [len(v) for v in load_digit_bank(split).by_value]
    sides, smallest, counts, values, labels = [], [], [], [], []
    for i in tqdm(range(count), desc="layouts", disable=not progress):
        layout = sample_layout(i, size=size, seed=seed, split=split, bank_sizes=bank_sizes)
        image_sides = [b[2] for b in layout.boxes]
        sides += image_sides
        smallest.append(min(image_sides))
        counts.append(len(layout.digits))
        values += layout.digits
        labels.append(layout.label)
    sides_arr, smallest_arr, counts_arr = np.array(sides), np.array(smallest), np.array(counts)
    return {
        "images": count,
        "size": size,
        "digit_side_quantiles": {f"{q}%": float(np.percentile(sides_arr, q)) for q in (10, 25, 50, 75, 90)},
        "digit_side_mean": float(sides_arr.mean()),
        "share_with_digit_at_most": {f"{t}px": float((smallest_arr <= t * size / REFERENCE_SIZE).mean())
                                     for t in (14, 28, 56, 112)},
        "digit_count_share": {str(k): float((counts_arr == k).mean()) for k in (3, 4, 5)},
        "digit_count_mean": float(counts_arr.mean()),
        "digit_value_counts": np.bincount(values, minlength=10).tolist(),
        "label_counts": np.bincount(labels, minlength=NUM_CLASSES).tolist(),
    }
