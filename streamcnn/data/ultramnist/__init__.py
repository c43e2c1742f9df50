"""UltraMNIST generator: faithful samples written as tiled pyramidal BigTIFFs, and its statistics.

A sample (Gupta et al., arXiv 2206.12681; ``docs/data.md`` lists the rules) is a binary
canvas holding 3 to 5 real MNIST digits whose SUM (0..27) is the label. One module per stage:

- :mod:`.layout`: :func:`sample_layout` draws everything random about image ``i`` from
  ``(seed, split, i)`` only (:class:`Layout`).
- :mod:`.render`: :func:`render_layout` turns a layout into the uint8 {0, 255} canvas.
- :mod:`.write`: :func:`write_pyramid_tiff`, atomically.
- :mod:`.generate`: :func:`generate_ultramnist`: the per-image jobs, resume, the manifest.
- :mod:`.preview`: :func:`write_preview`, a contact sheet.
- :mod:`.stats`: :func:`layout_statistics`, without pixels.
"""
from streamcnn.data.ultramnist.generate import MANIFEST_COLUMNS, generate_ultramnist, generation_seconds
from streamcnn.data.ultramnist.layout import MIN_DIGIT_PX, NUM_CLASSES, REFERENCE_SIZE, Layout, class_multisets, digit_side, sample_layout
from streamcnn.data.ultramnist.preview import write_preview
from streamcnn.data.ultramnist.render import render_layout
from streamcnn.data.ultramnist.stats import layout_statistics
from streamcnn.data.ultramnist.write import write_pyramid_tiff

__all__ = [
    "generation_seconds",
    "generate_ultramnist",
    "sample_layout",
    "render_layout",
    "write_pyramid_tiff",
    "write_preview",
    "layout_statistics",
    "Layout",
    "MANIFEST_COLUMNS",
    "REFERENCE_SIZE",
    "NUM_CLASSES",
]
