"""Devices, precision and the process group: what training and prediction both need from torch.

Prediction imports this, never the training module.
"""

from __future__ import annotations

import os

import torch

from .errors import CryoDDMError

# the precision vocabulary: fp16 only for prediction (training in fp16 would need a loss scaler)
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
PREDICT_PRECISIONS = (*TRAIN_PRECISIONS, "fp16")


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """`auto`/`cpu`/`cuda`/`cuda:N`/`mps` → a device that exists, or a `CryoDDMError` saying why not."""
    spec = (spec or "auto").strip().lower()
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        if n_cuda:
            return torch.device("cuda", (local_rank or 0) % n_cuda)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CryoDDMError(
                "--device mps: Apple's Metal backend is not available here "
                "(macOS with an Apple-silicon GPU and an MPS build of PyTorch)"
            )
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:") or spec.isdigit():
        index_text = spec.split(":", 1)[1] if ":" in spec else (spec if spec.isdigit() else "")
        if index_text and not index_text.isdigit():
            raise CryoDDMError(f"--device {spec}: a GPU is named cuda:N with N a number")
        index = int(index_text) if index_text else (local_rank or 0)
        if not n_cuda:
            raise CryoDDMError(
                f"--device {spec}: no CUDA GPU is available here (PyTorch "
                f"{torch.__version__}, CUDA {'built' if torch.backends.cuda.is_built() else 'not built'}); "
                "use --device cpu"
            )
        if index >= n_cuda:
            listed = ", ".join(f"cuda:{i}" for i in range(n_cuda))
            raise CryoDDMError(f"--device {spec}: there is no GPU {index}; this machine has {n_cuda} ({listed})")
        return torch.device("cuda", index)
    raise CryoDDMError(f"--device {spec!r}: use auto, cpu, cuda, cuda:N or mps")


def autocast_dtype(device: torch.device, precision: str, fp16: bool = False) -> torch.dtype | None:
    """The autocast dtype for `precision` (None = plain fp32). auto → bf16 on GPUs that have it;
    on older GPUs fp16 when the caller can use it (`fp16`: prediction; training would need a
    loss scaler), else fp32. A CPU stays fp32 unless bf16 is asked for: it changes results and
    is emulated, ~37× slower, on CPUs without AVX-512-BF16/AMX (`cpu_has_bf16`)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if not fp16 or device.type != "cuda":
            raise CryoDDMError("--precision fp16 needs a GPU and is for prediction; use bf16 or fp32")
        return torch.float16
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if fp16 else None
    return None


def join_process_group(device_spec: str = "auto") -> tuple[int, int, bool]:
    """(rank, world size, initialised here?) — joining a torchrun launch when there is one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available():
        on_gpu = torch.cuda.is_available() and device_spec.strip().lower() != "cpu"
        backend = "nccl" if on_gpu else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def cpu_has_bf16() -> bool:
    """AVX-512 (with BF16) or AMX: the CPUs on which bf16 autocast is not emulated."""
    return (
        "AVX512" in torch.backends.cpu.get_cpu_capability().upper()
        or "AMX" in torch.backends.cpu.get_cpu_capability().upper()
    )


def agreed(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank if it is true on any (a Stop seen by one rank stops them all)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
