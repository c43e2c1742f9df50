"""A PNG contact sheet of generated images (read from their pyramids) with digit boxes and labels."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from streamcnn.utils.files import save_figure

__all__ = ["write_preview"]


def write_preview(root: Path, rows: Sequence[dict], path: str | Path, thumb: int = 512) -> Path:
    """A PNG contact sheet of ``rows``' images (from their pyramids) with digit boxes and labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from streamcnn.io import open_image

    cols = min(4, len(rows))
    grid_rows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.2 * cols, 3.4 * grid_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), rows):
        with open_image(Path(root) / row["path"]) as reader:
            image = reader.read_thumbnail(thumb)[0]
            factor = image.shape[0] / reader.shape[1]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        for (x, y, w, h), d in zip(json.loads(row["boxes"]), json.loads(row["digits"])):
            ax.add_patch(Rectangle((x * factor - 0.5, y * factor - 0.5), w * factor, h * factor,
                                   fill=False, edgecolor="tab:red", linewidth=1))
            ax.text(x * factor, y * factor - 2, str(d), color="tab:red", fontsize=7, va="bottom")
        ax.set_title(f"{row['id']}  label {row['label']} = {' + '.join(map(str, json.loads(row['digits'])))}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
