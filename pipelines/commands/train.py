"""``slicreg train``: train the network on transferred supervoxels and write a weights bundle.

The config is a TOML file (example: ``pipelines/train.toml``)::

    [data]
    dataset = "runs/demo/prep/current"                    # preprocessed dataset folder (dataset.json, imagesTr/)
    transferred = "runs/demo/transfer/current"            # transfer output (transferred/<id>.nii.gz, fields/)
    fields = "runs/demo/transfer/current/fields"          # optional (target "displacement"): the transfer fields
    template_supervoxels = "runs/demo/supervoxels/current/supervoxels.nii.gz"
    cohort_stats = "runs/demo/cohort/current/cohort_stats.json"   # optional: provenance for the model card

    [output]
    dir = "runs/train"                                    # checkpoints, logs, curves
    bundle = "weights/slicreg-cohort-v3"                  # the weights bundle (default: <dir>/bundle)

    [run]
    threads = 2                                           # torch threads per process (default: torch's)

    [train]                                               # slicreg.train.TrainConfig; every key optional
    iterations = 400
    model = "deeplab"                                     # or "unet"
    target = "supervoxels"                                # or "displacement" (the Regression baseline)

Relative paths resolve against the current directory. Checkpoints are written every ``checkpoint_every`` steps,
so a run killed at any point continues with ``--resume``. Under ``torchrun --nproc_per_node N -m pipelines.cli
train --config ...`` the same command trains with DistributedDataParallel (the batch is split over processes).
"""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "train the network on transferred supervoxels (TOML config); resumable; writes a weights bundle"

SECTIONS = {"data": {"dataset", "transferred", "template_supervoxels", "cohort_stats", "fields"},
            "output": {"dir", "bundle"}, "run": {"threads"}, "train": None}


INPUTS = ("config", "init_weights")
OUTPUTS = ()
OUTPUT_DIRS = ("out", "bundle")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config (TOML, see pipelines/train.toml)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt if it exists")
    p.add_argument("--out", default=None, help="output folder (overrides [output] dir)")
    p.add_argument("--bundle", default=None, help="bundle folder (overrides [output] bundle)")
    p.add_argument("--iterations", type=int, default=None, help="override [train] iterations")
    p.add_argument("--init-weights", default=None, metavar="BUNDLE",
                   help="start from this weights bundle (fine-tuning; overrides [train] init_weights)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (overrides [run] threads)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def read_config(path: str) -> dict:
    """The TOML config as a dict, validated against :data:`SECTIONS` (unknown keys -> ConfigError)."""
    import tomllib
    from pathlib import Path

    from slicreg.errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (expected a TOML file in UTF-8)") from None
    unknown = set(doc) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{p}: unknown table(s) {sorted(unknown)}; expected {sorted(SECTIONS)}")
    for section, keys in SECTIONS.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: [{section}] must be a table")
        if keys is not None and set(table) - keys:
            raise ConfigError(f"{p}: unknown key(s) {sorted(set(table) - keys)} in [{section}]; "
                              f"allowed: {sorted(keys)}")
    for key in ("dataset", "transferred", "template_supervoxels"):
        if key not in doc.get("data", {}):
            raise ConfigError(f"{p}: [data] {key} is required")
    return doc


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import torch

    from slicreg.io import read_json
    from slicreg.train import TrainConfig, run_training

    doc = read_config(args.config)
    values = dict(doc.get("train", {}))
    if args.iterations is not None:
        values["iterations"] = args.iterations
    if args.init_weights is not None:
        values["init_weights"] = args.init_weights
    config = TrainConfig.from_dict(values, where=f"{args.config}: [train]")
    threads = args.threads if args.threads is not None else doc.get("run", {}).get("threads")
    if threads is not None:
        torch.set_num_threads(int(threads))
    data = doc["data"]
    out = Path(args.out or doc.get("output", {}).get("dir", "runs/train"))
    bundle = args.bundle or doc.get("output", {}).get("bundle")
    provenance = None
    if data.get("cohort_stats"):
        stats = read_json(data["cohort_stats"])
        provenance = {"cohort": {k: stats[k] for k in ("format", "seed", "n_train", "n_test", "config", "source")
                                 if k in stats}}
    result = run_training(config, dataset=data["dataset"], transferred=data["transferred"],
                          template_supervoxels=data["template_supervoxels"], out_dir=out, resume=args.resume,
                          bundle_dir=bundle, provenance=provenance, quiet=args.quiet, fields=data.get("fields"))
    if int(os.environ.get("RANK", "0")) == 0:
        val = result.validation or {}
        metric = (f"end-point error {val.get('val_epe_mm', float('nan')):.2f} mm" if config.target == "displacement"
                  else f"accuracy {val.get('val_accuracy', float('nan')):.3f}")
        print(f"trained {result.iterations} steps in {result.wall_s / 60:.1f} min; final loss "
              f"{result.final_loss:.3f}; validation loss {val.get('val_loss', float('nan')):.3f}, {metric}")
        print(f"bundle: {result.bundle}\nlogs: {out / 'log.csv'}, curves: {out / 'curves.png'}")
    return 0
