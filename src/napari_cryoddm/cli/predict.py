"""`cryoddm predict MODEL INPUTS… -o OUT`: denoise micrographs, here or across a dask cluster."""

from __future__ import annotations

import argparse
import sys

from ..config import add_config_arguments, config_from_args
from ..errors import CryoDDMError
from ..jobs import CancelToken, run_job
from ..predict import PredictConfig
from . import wrap

EPILOG = """\
outputs: OUT/<stem><suffix>.mrc, float32, with the input's voxel size (× the bin factor when the
checkpoint was trained on binned micrographs) and labels recording the source, model and scaling.
Existing outputs are skipped, so rerunning a stopped command resumes it (--overwrite replaces them).

examples:
  cryoddm predict sample Micrographs/ -o Denoised/     # the built-in model (sample data)
  cryoddm predict model.pt Micrographs/ -o Denoised/
  cryoddm predict model.pt 'raw/*.mrc' -o den/ --device cuda:0 --batch-size 16
  cryoddm predict model.pt raw/ -o den/ --gpus 0,1,2,3          # one dask worker per GPU
  cryoddm predict model.pt raw/ -o den/ --workers 4 --threads 4 # four CPU worker processes
  cryoddm predict model.pt raw/ -o den/ --scheduler tcp://head-node:8786
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="denoise micrographs with a trained model (tiled, seam-free)",
        description=wrap(
            "Denoise whole micrographs with a trained CryoDDM model: tiles "
            "with margins covering the network's receptive field, batched, "
            "on a CPU, a GPU, several GPUs or a dask cluster."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        help="checkpoint: napari-cryoddm .pt, the original's N.pth / checkpoint.pth, "
        "or a built-in model's name (sample)",
    )
    p.add_argument("inputs", nargs="+", help="micrographs: files, folders or quoted globs")
    p.add_argument("-o", "--out", required=True, help="output folder (created if missing)")
    add_config_arguments(p, PredictConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(PredictConfig, args)
    cancel = CancelToken()
    distributed = bool(config.gpus or config.workers or config.scheduler)
    if sum(bool(v) for v in (config.gpus, config.workers, config.scheduler)) > 1:
        raise CryoDDMError("give one of --gpus, --workers and --scheduler")
    if distributed:
        from ..distributed import predict_distributed

        job = predict_distributed(args.model, args.inputs, args.out, config, cancel=cancel)
    else:
        from ..predict import predict_files

        job = predict_files(args.model, args.inputs, args.out, config, cancel=cancel)
    result = run_job(job, desc="predict", cancel=cancel)
    print(result.summary(), file=sys.stderr)
    if cancel.cancelled:
        print("stopped; rerun the same command to finish (done files are skipped)", file=sys.stderr)
        return cancel.exit_code
    return 1 if result.failed else 0
