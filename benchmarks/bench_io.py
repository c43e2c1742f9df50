"""Benchmark: UltraMNIST generation time at 4000^2 and region read latency per reader backend.

    python benchmarks/bench_io.py                       # 8 images, 50 reads per backend
    python benchmarks/bench_io.py --images 4 --reads 20 # quicker

Generation runs in this process on one core: libvips is limited to one thread
(``VIPS_CONCURRENCY=1``, set before pyvips loads) unless ``--vips-threads`` says otherwise.
Reads: random 512^2 windows of level 0 of a generated 4000^2 image, via each backend of
``streamcnn.io``; the PNG (libvips) row also reports the first read, which decodes the whole
image. Prints a table and writes JSON (machine, versions, date, load average) to
``benchmarks/results/io.json``. Timings taken while other jobs run are not comparable:
check ``load_average_before`` in the JSON.
"""
from __future__ import annotations

import argparse
import os

if __name__ == "__main__":  # libvips reads VIPS_CONCURRENCY when pyvips is first imported
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--vips-threads", default="1")
    os.environ["VIPS_CONCURRENCY"] = _pre.parse_known_args()[0].vips_threads

import statistics
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from common import RESULTS


def environment() -> dict:
    return {**common.environment("cpu"), "vips_concurrency": os.environ.get("VIPS_CONCURRENCY")}


def bench_generation(folder: Path, images: int, size: int) -> dict:
    from streamcnn.data import load_digit_bank, render_layout, sample_layout
    from streamcnn.data.ultramnist import write_pyramid_tiff

    bank = load_digit_bank("train")
    sizes = [len(v) for v in bank.by_value]
    render_s, write_s, file_mb = [], [], []
    for i in range(images):
        t0 = time.perf_counter()
        image = render_layout(sample_layout(i, size=size, bank_sizes=sizes), bank)
        t1 = time.perf_counter()
        path = folder / f"{i}.tiff"
        write_pyramid_tiff(image, path)
        t2 = time.perf_counter()
        render_s.append(t1 - t0)
        write_s.append(t2 - t1)
        file_mb.append(path.stat().st_size / 1e6)
    total = [r + w for r, w in zip(render_s, write_s)]
    return {"images": images, "size": size, "seconds_per_image_median": statistics.median(total),
            "seconds_per_image_mean": statistics.fmean(total), "render_seconds_median": statistics.median(render_s),
            "write_seconds_median": statistics.median(write_s), "file_mb_median": statistics.median(file_mb)}


def bench_reads(folder: Path, source: Path, reads: int, region: int) -> list[dict]:
    import pyvips

    from streamcnn.io import open_image

    png = folder / "image.png"
    pyvips.Image.new_from_file(str(source)).pngsave(str(png), compression=1)
    cases = [("tiff (tifffile + zarr)", source, "tiff"), ("slide (OpenSlide)", source, "slide"),
             ("vips (PNG)", png, "vips")]
    rows = []
    for name, path, backend in cases:
        reader = open_image(path, backend=backend)
        _, h, w = reader.shape
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        reader.read_region(0, 0, region, region)
        first = time.perf_counter() - t0
        times = []
        for _ in range(reads):
            top, left = int(rng.integers(h - region)), int(rng.integers(w - region))
            t0 = time.perf_counter()
            reader.read_region(top, left, region, region)
            times.append(time.perf_counter() - t0)
        reader.close()
        rows.append({"backend": name, "file": path.suffix, "region": region, "reads": reads,
                     "first_read_ms": first * 1e3, "median_ms": statistics.median(times) * 1e3,
                     "p90_ms": float(np.percentile(times, 90)) * 1e3})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="4000^2 images to generate (default 8)")
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--reads", type=int, default=50, help="timed region reads per backend")
    parser.add_argument("--region", type=int, default=512)
    parser.add_argument("--vips-threads", default="1", help="libvips threads (default 1: per-core figure)")
    parser.add_argument("--out", type=Path, default=RESULTS / "io.json")
    args = parser.parse_args(argv)

    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generation = bench_generation(folder, args.images, args.size)
        reads = bench_reads(folder, folder / "0.tiff", args.reads, args.region)
    env["load_average_after"] = os.getloadavg()

    print(f"UltraMNIST generation, {args.size}^2, {args.images} images, 1 process, "
          f"VIPS_CONCURRENCY={env['vips_concurrency']}:")
    print("| s/image (median) | render s | write s | file MB |")
    print("|---|---|---|---|")
    g = generation
    print(f"| {g['seconds_per_image_median']:.2f} | {g['render_seconds_median']:.2f} | "
          f"{g['write_seconds_median']:.2f} | {g['file_mb_median']:.2f} |")
    print(f"\nRegion reads, {args.region}^2 at level 0 of a {args.size}^2 UltraMNIST image, {args.reads} random reads:")
    print("| backend | first read ms | median ms | p90 ms |")
    print("|---|---|---|---|")
    for r in reads:
        print(f"| {r['backend']} | {r['first_read_ms']:.1f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |")
    print(f"\nload average before/after: {env['load_average_before']} / {env['load_average_after']}")

    common.write_json(args.out, {"environment": env, "generation": generation, "reads": reads})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
