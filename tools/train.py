#!/usr/bin/env python
"""Train a full-resolution CNN inside a memory budget.

    python tools/train.py --budget 11GB                       # CUDA: UltraMNIST 4000 x 4000; CPU: the miniature
    python tools/train.py --preset ultramnist-4000 --device cpu   # the 4000 x 4000 protocol on any device
    python tools/train.py --preset miniature                  # the 128 px miniature on any device
    python tools/train.py --config configs/ultramnist-4000-resnet50-11gb.yaml --data DIR
    python tools/train.py --config ... --set optim.lr=3e-4 --set train.epochs=20
    python tools/train.py --out runs/x --resume               # continue a stopped run (its config.yaml)
    torchrun --nproc_per_node 4 tools/train.py --config ...   # DDP, one process per GPU

Configuration: the embedded defaults (``streamcnn.training.config``), then ``--config`` or
``--preset`` (with ``--resume`` and neither: the run's own ``OUT/config.yaml``; with neither and
no ``--data``: the preset for the device, ``choose_preset``), then the flags
below, then ``--set section.key=value`` (any key; see docs/training.md). Arguments and the
config are checked before torch is imported, so mistakes are reported at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))      # tools/_preflight.py, also when loaded by path
from _preflight import check_budget, check_exists, config_module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--preset", help="miniature or ultramnist-4000 (default: ultramnist-4000 on CUDA, "
                                         "miniature elsewhere)")
    parser.add_argument("--data", help="data folder with manifest.csv (path,label), or a slide table CSV; "
                        "default: generated UltraMNIST")
    parser.add_argument("--val-data", help="validation folder with manifest.csv (default: none, or data.val_fraction)")
    parser.add_argument("--out", help="run folder (default: runs/<date-time>)")
    parser.add_argument("--budget", help="peak device memory allowed, e.g. 11GB or 24GiB (enforced on CUDA)")
    parser.add_argument("--epochs", type=int, help="number of epochs")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    parser.add_argument("--max-minutes", type=float, help="stop after this many minutes (then evaluate and save)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, help="random seed (model init, data order)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set optim.lr=3e-4 (repeatable)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace, load_config=None):
    flags = {"data.root": args.data, "out": args.out, "plan.budget": args.budget, "train.epochs": args.epochs,
             "train.max_steps": args.max_steps, "train.max_minutes": args.max_minutes, "train.device": args.device, "train.seed": args.seed}
    overrides = [(key, value) for key, value in flags.items() if value is not None]
    if args.data is not None:
        overrides.append(("data.kind", "manifest"))
        if Path(args.data).is_file():      # a table: its folder is the root
            overrides += [("data.root", str(Path(args.data).parent)), ("data.manifest", Path(args.data).name)]
    if args.val_data is not None:
        overrides += [("data.val_root", args.val_data), ("data.val_manifest", "manifest.csv")]
    if load_config is None:
        load_config = config_module().load_config
    config_file = config_file_of(args)[0]
    if args.data is not None:
        overrides += _slide_defaults(config_file, args.overrides)
    return load_config(config_file, overrides + list(args.overrides))


def config_file_of(args: argparse.Namespace) -> tuple[Path | str | None, str | None]:
    """(the YAML the run starts from, its preset): ``--config``, a resumed run's own ``config.yaml``,
    or a preset (``--preset``, else the device's when neither ``--config`` nor ``--data`` is given)."""
    if args.config is not None and args.preset is not None:
        raise ValueError("--config and --preset both name the run's settings: pass one of them")
    if args.config is not None:
        return args.config, None
    if args.resume and args.preset is None and args.out is not None and (Path(args.out) / "config.yaml").is_file():
        return Path(args.out) / "config.yaml", None     # the run's own resolved config
    if args.preset is None and args.data is not None:
        return None, None                               # the user's data with the embedded defaults
    module = config_module()
    preset = module.choose_preset(args.preset, _device_type(args.device))
    return module.preset_path(preset), preset


def _device_type(device: str | None) -> str:
    if device not in (None, "auto"):
        return device.split(":")[0]
    import torch      # only to ask whether a GPU is there
    return "cuda" if torch.cuda.is_available() else "cpu"


#: --data: what slides get where the config file and --set say nothing (the embedded defaults are the
#: UltraMNIST protocol's): one image per step (sizes differ), accumulated to an effective batch of
#: min(16, training images); a torchvision ResNet-18; AdamW's usual lr without the 25-step warmup
SLIDE_DEFAULTS = {"model.trunk": "resnet18", "optim.lr": 1e-3, "optim.warmup_steps": 0}
BATCH_KEYS = ("train.batch_size", "train.accumulate", "train.effective_batch")


def _slide_defaults(config_file, overrides: list[str]) -> list[tuple[str, object]]:
    chosen = [(key, value) for key, value in SLIDE_DEFAULTS.items() if not _user_sets(key, config_file, overrides)]
    if not any(_user_sets(key, config_file, overrides) for key in BATCH_KEYS):
        chosen += [("train.batch_size", 1), ("train.effective_batch", 16)]
    return chosen


def _user_sets(key: str, config_file, overrides: list[str]) -> bool:
    """Whether the config file or a ``--set`` gives ``key`` (section.name)."""
    if any(o.partition("=")[0].strip() == key for o in overrides):
        return True
    if config_file is None or not Path(config_file).is_file():
        return False
    import yaml

    try:
        tree = yaml.safe_load(Path(config_file).read_text()) or {}
    except yaml.YAMLError:
        return False        # load_config names the problem
    section, name = key.split(".")
    return isinstance(tree, dict) and isinstance(tree.get(section), dict) and name in tree[section]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_budget(args.budget)
        check_exists(args.data, "data folder", "pass --data DIR with a manifest.csv")
        check_exists(args.val_data, "validation folder", "pass --val-data DIR with a manifest.csv")
        if args.resume and args.out is None:
            raise ValueError("--resume needs the run's folder: pass --out DIR (the folder holding last.pt)")
        if args.resume and args.config is None and args.data is None and not (Path(args.out) / "config.yaml").is_file():
            raise FileNotFoundError(f"{Path(args.out) / 'config.yaml'} does not exist: there is no run to resume in "
                                    f"{args.out} (start it without --resume, or pass --config/--data)")
        if not args.resume and args.out is not None and (Path(args.out) / "last.pt").exists():
            raise FileExistsError(f"{Path(args.out) / 'last.pt'} exists: pass --resume to continue that run, "
                                  "or choose another --out")
        checked = config_from_args(args)
    except (FileNotFoundError, FileExistsError, ValueError) as error:  # ConfigError is a ValueError
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    from streamcnn.planning.search import BudgetError
    from streamcnn.training import NonFiniteLossError, TrainConfig, fit
    from streamcnn.training.spec import describe_run

    try:
        config = TrainConfig.model_validate(checked.to_dict())
        if int(os.environ.get("RANK", "0")) == 0 and config.train.progress:
            print(describe_run(config, config_file_of(args)[1]), flush=True)
        history = fit(config, resume=args.resume)
    except (BudgetError, NonFiniteLossError, FileNotFoundError, FileExistsError, ValueError, ImportError) as error:
        # Bad configs, budgets nothing fits, bad data, NaN losses: one line, no traceback.
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    if history:
        last = history[-1]
        accuracy = "n/a" if last["val_accuracy"] is None else f"{last['val_accuracy']:.1%}"
        print(f"done: {len(history)} epochs, {last['step']} steps, train loss {last['train_loss']:.4f}, "
              f"val accuracy {accuracy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
