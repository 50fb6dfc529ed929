"""`cryoddm train FORWARD_DIR -o OUT`: train the U-Net on a forward folder (CPU, GPU, torchrun DDP).

Several GPUs: `torchrun --nproc_per_node=N -m napari_cryoddm train FORWARD_DIR -o OUT …`; every
process runs this command, only rank 0 shows progress and writes.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from ..config import add_config_arguments, config_from_args
from ..jobs import CancelToken, run_job
from ..train import TrainConfig, train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the CryoDDM U-Net on a forward folder (S1, S2, S3 + validation per epoch)",
        description="Train the CryoDDM U-Net on the output of `cryoddm forward`. Writes OUT/last.pt "
        "every epoch (resumable), OUT/best.pt by validation loss and OUT/history.json. "
        "Ctrl-C stops after the current batch and saves a resumable last.pt; "
        "--resume continues it exactly. Several GPUs: torchrun --nproc_per_node=N "
        "-m napari_cryoddm train ….",
    )
    p.add_argument(
        "forward_dir",
        type=Path,
        metavar="FORWARD_DIR",
        help="forward output folder (s1/, s2/, s3/, val/; forward.json when ours)",
    )
    p.add_argument(
        "-o", "--out", type=Path, required=True, metavar="OUT", help="folder for last.pt, best.pt and history.json"
    )
    add_config_arguments(p, TrainConfig)
    # None = not given: a fresh run takes the default, --resume the stopped run's number
    p.set_defaults(func=run, epochs=None)


def run(args: argparse.Namespace) -> int:
    epochs_given = args.epochs is not None
    if not epochs_given:
        del args.epochs  # the dataclass default
    config = config_from_args(TrainConfig, args)
    rank = int(os.environ.get("RANK", "0"))
    cancel = CancelToken()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # shown once through logging instead
        result = run_job(
            train(args.forward_dir, args.out, config, cancel, epochs_given=epochs_given),
            desc="train",
            cancel=cancel,
            quiet=rank != 0,
        )
    if rank == 0:
        for h in result.history[-3:]:
            print(f"epoch {h['epoch']}: S1 {h['s1']:.5g}  S2 {h['s2']:.5g}  S3 {h['s3']:.5g}  val {h['val']:.5g}")
        if result.stopped:
            print(f"stopped; resume with: cryoddm train {args.forward_dir} -o {args.out} --resume")
        print(
            f"last: {result.last}"
            + (f"  best: {result.best} (epoch {result.best_epoch}, val {result.best_val:.5g})" if result.best else "")
        )
    return cancel.exit_code if result.stopped else 0
