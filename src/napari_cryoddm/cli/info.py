"""`cryoddm info FILE…`: what the headers say, without reading pixels."""

from __future__ import annotations

import argparse
import json

from ..io.mrc import read_header


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show shape, mode, voxel size and extended header of MRC files")
    p.add_argument("files", nargs="+", help="MRC files (.mrc .mrcs .mrc.gz .mrcs.gz .st .map .rec)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for f in args.files:
        info = read_header(f)
        if args.json:
            print(json.dumps(info.summary()))
            continue
        shape = "×".join(str(n) for n in info.shape)
        kind = "stack" if info.is_stack else ("volume" if len(info.shape) == 3 else "image")
        ext = info.exttyp or "none"
        vs = f"{info.voxel_size:.4f} Å/px" if info.voxel_size else "unknown"
        print(f"{info.path}: {kind} {shape} ({info.dtype}, mode {info.mode}), voxel size {vs}, "
              f"extended header {ext}{', gzip' if info.compressed else ''}")
    return 0
