"""`cryoddm info FILE…`: what the headers say (shape, mode, voxel size, extended header), without
reading pixels. Files, folders and globs; a bad file is reported and the others still shown."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ..errors import CryoDDMError
from ..io.mrc import MrcInfo, list_micrographs, read_extended_header, read_header

_MODE_NAMES = {
    0: "int8",
    1: "int16",
    2: "float32",
    3: "complex int16",
    4: "complex64",
    6: "uint16",
    12: "float16",
    101: "4-bit",
}
# FEI1/FEI2 extended-header fields worth a line, with the factor to a readable unit
_UNDERFOCUS = "underfocus"
_FEI_FIELDS = (
    ("HT", "HT", 1e-3, "kV"),
    ("Dose", "dose", 1e-20, "e/Å²"),
    ("Pixel size X", "pixel size", 1e10, "Å"),
    # EPU versions write the measured and the applied defocus with either sign (2.9:
    # measured +, applied −; 1.2: both −) for the same underfocused image: shown as
    # RELION does, underfocus positive, one convention for both fields
    ("Defocus", "defocus", _UNDERFOCUS, "µm underfocus"),
    ("Applied defocus", "applied defocus", _UNDERFOCUS, "µm underfocus"),
    ("Magnification", "magnification", 1, "×"),
    ("Camera name", "camera", None, ""),
    ("Application version", "EPU", None, ""),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show shape, mode, voxel size and extended header of MRC files",
        description="Read MRC headers only (never the pixels) and print one line per "
        "file: shape, data mode, voxel size, extended header type.",
    )
    p.add_argument("files", nargs="+", help="MRC files (.mrc .mrcs .mrc.gz .mrcs.gz .st .map .rec), folders or globs")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--extended",
        action="store_true",
        help="also show the microscope fields of FEI1/FEI2 extended headers "
        "(voltage, dose, pixel size, defocus, camera)",
    )
    p.set_defaults(func=run)


def _fei_fields(info: MrcInfo) -> dict:
    if info.exttyp not in ("FEI1", "FEI2"):
        return {}
    ext = read_extended_header(info.path)
    if ext is None or not len(ext):
        return {}
    first = ext[0]
    out: dict = {}
    for field, label, factor, unit in _FEI_FIELDS:
        if field not in (ext.dtype.names or ()):
            continue
        value = first[field]
        if isinstance(value, (bytes, np.bytes_)):
            text = value.decode("ascii", "replace").strip("\x00 ")
            if text:
                out[label] = text
        elif factor is not None and np.isfinite(value) and value:
            v = abs(float(value)) * 1e6 if factor == _UNDERFOCUS else float(value) * factor
            out[label] = f"{v:,.0f}×" if unit == "×" else f"{v:.4g} {unit}"
    return out


def describe(info: MrcInfo) -> str:
    kind = "stack" if info.is_stack else ("volume" if len(info.shape) == 3 else "image")
    axes = {"stack": "images×rows×columns", "volume": "sections×rows×columns"}.get(kind, "rows×columns")
    shape = "×".join(str(n) for n in info.shape) + f" ({axes})"
    mode = f"mode {info.mode} {_MODE_NAMES.get(info.mode, '?')}"
    ext = f"{info.exttyp or 'unknown type'} ({info.nsymbt} bytes)" if info.nsymbt else "none"
    vs = f"{info.voxel_size:.4f} Å/px" if info.voxel_size else "unknown"
    if info.voxel_size and abs(info.voxel_size - 1.0) < 1e-6:
        vs += " (1.0 is what writers put when they do not know: check the real pixel size)"
    return (
        f"{info.path}: {kind} {shape} ({mode}), voxel size {vs}, extended header {ext}"
        f"{', gzip' if info.compressed else ''}"
    )


def run(args: argparse.Namespace) -> int:
    failed = 0
    for spec in args.files:
        try:
            paths = list_micrographs(spec)
        except CryoDDMError as exc:
            print(f"cryoddm info: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        for path in paths:
            try:
                info = read_header(path)
                fei = _fei_fields(info) if args.extended else {}
            except CryoDDMError as exc:
                print(f"cryoddm info: error: {exc}", file=sys.stderr)
                failed += 1
                continue
            if args.json:
                print(
                    json.dumps(
                        {
                            **info.summary(),
                            "nsymbt": info.nsymbt,
                            "labels": list(info.labels),
                            **({"extended": fei} if fei else {}),
                        }
                    )
                )
                continue
            print(describe(info))
            if fei:
                print("    " + ", ".join(f"{k} {v}" for k, v in fei.items()))
    return 2 if failed else 0
