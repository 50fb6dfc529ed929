"""The machine line every benchmark prints beside its table (the tables of docs/benchmarks.md name it)."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):  # pragma: no cover
        mem = float("nan")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        version = f", torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        gpu, version = "no GPU", ""
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}, {mem:.0f} GB{version}"
