"""Checkpoints that carry their own metadata and cannot run code.

Ours are one `torch.save` file of plain types and tensors::

    {"format": "napari-cryoddm-checkpoint", "version": 1, "state_dict": {...},
     "metadata": {...JSON-safe...}, "resume": {...} (optional)}

and are read with `torch.load(weights_only=True)`, which refuses every pickle global outside
torch's tensor/container allowlist, so a checkpoint can never execute code.

The original CryoDDM saved whole pickled modules (`N.pth`: a `unet2d.UDenoiseNet` holding
`torch.nn` Sequential/Conv2d/LeakyReLU/MaxPool2d) and dicts (`checkpoint.pth`:
`{"epoch", "model_state_dict", "optimizer_state_dict"}`). Both are read with `weights_only=True`
inside `torch.serialization.safe_globals` naming exactly those layer classes and an inert stub
standing in for `unet2d.UDenoiseNet`; the 34 tensors are then copied into our `UDenoiseNet`.
They carry no metadata; the original trained on min–max normalised micrographs, unbinned.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .atomic import atomic_write
from .config import to_jsonable
from .errors import InputError
from .model import ARCHITECTURE, UDenoiseNet
from .normalise import MINMAX

FORMAT = "napari-cryoddm-checkpoint"
VERSION = 1
KINDS = ("cryoddm", "original-module", "original-dict")


class _OriginalUDenoiseNetStub(nn.Module):
    """Stands in for the original's `unet2d.UDenoiseNet` while unpickling: no code, no forward.

    The weights-only unpickler creates it with `__new__` and fills its `__dict__`; we only read
    the tensors out of it.
    """

    def forward(self, *args: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("stub of the original network; copy its tensors into UDenoiseNet")


# Exactly what the original's whole-module pickles reference beyond plain tensors.
_ORIGINAL_GLOBALS: list[Any] = [
    (_OriginalUDenoiseNetStub, "unet2d.UDenoiseNet"),
    nn.Sequential,
    nn.Conv2d,
    nn.LeakyReLU,
    nn.MaxPool2d,
    collections.OrderedDict,
    set,
    torch._utils._rebuild_parameter,
    torch._utils._rebuild_tensor_v2,
]


@dataclass
class LoadedCheckpoint:
    """A network ready for inference or fine-tuning, what is known about its training, its origin."""

    model: UDenoiseNet = field(repr=False)
    metadata: dict[str, Any]
    kind: str
    resume: dict[str, Any] | None = field(default=None, repr=False)
    path: Path | None = None


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """The state_dict keys and shapes of our (and the original's) network."""
    return {k: tuple(v.shape) for k, v in UDenoiseNet().state_dict().items()}


def _state_dict_of(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        inner = getattr(model_or_state, "module", model_or_state)  # unwrap DDP
        state = inner.state_dict()
    else:
        state = model_or_state
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | dict[str, torch.Tensor],
    metadata: dict[str, Any],
    resume: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename): a crash never leaves half a file.

    `metadata` is converted to JSON-safe types; `resume` may hold tensors and plain containers.
    """
    path = Path(path)
    meta = to_jsonable(dict(metadata))
    meta.setdefault("architecture", dict(ARCHITECTURE))
    meta.setdefault("package_version", __version__)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "state_dict": _state_dict_of(model),
        "metadata": meta,
    }
    if resume is not None:
        payload["resume"] = resume
    buffer = io.BytesIO()  # serialised first: a full disk then fails as an OSError naming the file,
    torch.save(payload, buffer)  # not inside torch's zip writer ("unexpected pos …")
    with atomic_write(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
    return path


# torch's advice around a refusal ("Re-running torch.load with weights_only set to False will
# likely succeed …") invites running untrusted code: never passed on to users
_TORCH_ADVICE = (
    "weights_only",
    "weights only",
    "re-running",
    "file an issue",
    "documentation",
    "http",
    "trusted source",
    "pytorch 2.6",
)


def _reason(text: str, fallback: str) -> str:
    """The specific reason in a torch loading error, without torch's advice."""
    kept = []
    for line in text.splitlines():
        line = re.sub(r"^.*WeightsUnpickler error:\s*", "", line.strip())
        if line and not any(a in line.lower() for a in _TORCH_ADVICE):
            kept.append(line)
    return "; ".join(kept)[:300] or fallback


def _refusal(path: Path, exc: BaseException) -> InputError:
    text = str(exc)
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|GLOBAL) ([\w.]+)", text)
    if m:
        return InputError(
            path,
            f"refused: the file asks the unpickler for {m.group(1)}, which no "
            "CryoDDM checkpoint needs (nothing was run). Only napari-cryoddm "
            "checkpoints and the original CryoDDM's .pth files are accepted.",
        )
    reason = _reason(text, type(exc).__name__)
    return InputError(
        path,
        f"refused: not a PyTorch checkpoint that can be read safely ({reason}); "
        "nothing was run. Only napari-cryoddm checkpoints and the original "
        "CryoDDM's .pth files are accepted.",
    )


def _load_raw(path: Path, map_location: Any) -> Any:
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not a checkpoint file")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise InputError(path, "not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        with torch.serialization.safe_globals(_ORIGINAL_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes ask users to file issues
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        io.UnsupportedOperation,
        AttributeError,
        KeyError,
        TypeError,
        OSError,
    ) as exc:
        raise _refusal(path, exc) from None


def _module_tensors(module: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Walk an unpickled module's `_parameters`/`_buffers`/`_modules` without calling its methods."""
    d = getattr(module, "__dict__", {})
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, t in (d.get(group) or {}).items():
            if t is not None and name not in (d.get("_non_persistent_buffers_set") or set()):
                out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else t
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            out.update(_module_tensors(child, prefix + name + "."))
    return out


def _check_architecture(path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Strip a DDP `module.` prefix; refuse anything whose keys or shapes differ from ours."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    want = expected_shapes()
    problems: list[str] = []
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing:
        problems.append(f"missing {len(missing)} keys ({', '.join(missing[:6])}{' …' if len(missing) > 6 else ''})")
    if extra:
        problems.append(f"unexpected {len(extra)} keys ({', '.join(extra[:6])}{' …' if len(extra) > 6 else ''})")
    for k, shape in want.items():
        v = state.get(k)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            problems.append(f"{k} is a {type(v).__name__}, not a tensor")
        elif tuple(v.shape) != shape:
            problems.append(f"{k} has shape {list(v.shape)}, UDenoiseNet needs {list(shape)}")
    if problems:
        raise InputError(path, "not a CryoDDM UDenoiseNet (nf=48, 11×11 first layer): " + "; ".join(problems[:8]))
    return state


def _original_metadata(kind: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "architecture": dict(ARCHITECTURE),
        "source": f"original CryoDDM checkpoint ({kind})",
        "normalisation": MINMAX.to_dict(),
        "bin_factor": 1,
        "window": None,
        "diameter_px": None,
        "voxel_size": None,
        "schedule": None,
        "forward": None,
        "epoch": None,
        "losses": None,
        "package_version": None,
    }
    meta.update(extra or {})
    return meta


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> LoadedCheckpoint:
    """Load ours, the original's whole-module `N.pth`, or its `checkpoint.pth` dict — never code.

    Returns the network (in eval mode, on `map_location`'s device when that is a device), the
    metadata (the original's get min–max normalisation and bin 1) and the kind. A built-in
    model's name (`sample`) stands for its installed file.
    """
    from .models import resolve_model

    path = resolve_model(path)
    obj = _load_raw(path, map_location)
    resume = None
    if isinstance(obj, _OriginalUDenoiseNetStub):
        kind = "original-module"
        state = _module_tensors(obj)
        meta = _original_metadata(kind)
    elif isinstance(obj, dict) and obj.get("format") == FORMAT:
        kind = "cryoddm"
        if int(obj.get("version", 0)) > VERSION:
            raise InputError(
                path,
                f"checkpoint format version {obj.get('version')} is newer than this "
                f"napari-cryoddm understands ({VERSION}); upgrade the package",
            )
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise InputError(path, "napari-cryoddm checkpoint without a state_dict")
        meta = dict(obj.get("metadata") or {})
        resume = obj.get("resume")
    elif isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        kind = "original-dict"
        state = obj["model_state_dict"]
        epoch = obj.get("epoch")
        meta = _original_metadata(kind, {"epoch": int(epoch) + 1 if isinstance(epoch, int) else None})
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = "original-dict"  # a bare state_dict, e.g. torch.save(model.state_dict())
        state = obj
        meta = _original_metadata(kind)
    elif isinstance(obj, nn.Module):
        raise InputError(path, f"holds a {type(obj).__name__} module, not a CryoDDM UDenoiseNet")
    else:
        raise InputError(
            path,
            f"holds a {type(obj).__name__}, not a CryoDDM checkpoint "
            "(napari-cryoddm .pt, the original's N.pth or checkpoint.pth)",
        )
    state = _check_architecture(path, state)
    diverged = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if diverged:
        raise InputError(
            path,
            f"{len(diverged)} weight tensors hold NaN or infinite values "
            f"({', '.join(diverged[:3])}{' …' if len(diverged) > 3 else ''}): the "
            "training that wrote it diverged; this checkpoint cannot denoise",
        )
    arch = meta.get("architecture") or {}
    if arch and any(arch.get(k) != v for k, v in ARCHITECTURE.items() if k in arch):
        raise InputError(path, f"architecture {arch} differs from {ARCHITECTURE}")
    model = UDenoiseNet()
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    device = _device_of(map_location)
    if device is not None:
        model.to(device)
    model.eval()
    return LoadedCheckpoint(model=model, metadata=meta, kind=kind, resume=resume, path=path)


def _device_of(map_location: Any) -> torch.device | None:
    if isinstance(map_location, torch.device):
        return map_location
    if isinstance(map_location, str):
        try:
            return torch.device(map_location)
        except RuntimeError:
            return None
    return None
