"""Data for streamcnn: the UltraMNIST generator, digit banks, and a manifest-driven Dataset.

- :func:`generate_ultramnist`: faithful UltraMNIST samples as tiled pyramidal BigTIFFs + manifest.
- :func:`layout_statistics`: the generator's statistics (digit sizes, counts), without pixels.
- :func:`load_digit_bank`: the packaged MNIST digits or the user's MNIST IDX files.
- :class:`ManifestDataset`, :func:`collate_images`: images listed in a CSV, read lazily.
- Slides (docs/pathology.md): :func:`read_slide_table`, :func:`inspect_slides`, :class:`SlideView`,
  :func:`otsu_threshold`, :func:`generate_demo_slides`, :class:`AugmentedView` (augmentation a
  tiled read applies exactly), :func:`grouped_stratified_split` (train/val/test by patient).
"""
from streamcnn.data.augment import AugmentedDataset, AugmentedView
from streamcnn.data.dataset import ManifestDataset, collate_images
from streamcnn.data.demo_slides import generate_demo_slides
from streamcnn.data.slides import SlideView, inspect_slides
from streamcnn.data.splits import grouped_stratified_split
from streamcnn.data.table import read_slide_table
from streamcnn.data.tissue import otsu_threshold
from streamcnn.data.digits import DigitBank, load_digit_bank
from streamcnn.data.ultramnist import generate_ultramnist, layout_statistics, render_layout, sample_layout

__all__ = [
    "ManifestDataset",
    "collate_images",
    "generate_ultramnist",
    "layout_statistics",
    "sample_layout",
    "render_layout",
    "load_digit_bank",
    "DigitBank",
    "read_slide_table",
    "inspect_slides",
    "SlideView",
    "otsu_threshold",
    "generate_demo_slides",
    "AugmentedView",
    "AugmentedDataset",
    "grouped_stratified_split",
]
