"""Small utilities every layer may use: units and sizes, atomic files, RSS, CPU facts, the allocator.

- :mod:`streamcnn.utils.units`: memory sizes, autocast dtypes, pixels to [0, 1], (h, w) pairs.
- :mod:`streamcnn.utils.files`: atomic writes, matplotlib figures.
- :mod:`streamcnn.utils.rss`: the process's resident memory, now and at its peak.
- :mod:`streamcnn.utils.cpu`: the autocast dtype and memory layout a CPU runs fast; usable cores.
- :mod:`streamcnn.utils.allocator`: keeping freed heap memory between steps (glibc).
"""
