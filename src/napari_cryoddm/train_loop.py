"""One training run, step by step: build (model, optimiser, data, loaders), restore a stopped
run, train an epoch, validate, and checkpoint (`last.pt` with its resume state, `best.pt`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from . import __version__
from .atomic import atomic_write
from .checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from .config import to_jsonable
from .devices import agreed, autocast_dtype, cpu_has_bf16
from .diffusion import schedule_coefficients
from .errors import CryoDDMError, InputError
from .forward_layout import ForwardData
from .jobs import CancelToken, Job, Progress
from .linear import LinearPlusNet, zero_output_layer
from .model import ARCHITECTURE, UDenoiseNet
from .train_config import HISTORY, PLAN_FIELDS, TrainConfig
from .train_data import (
    PHASES,
    S1,
    PairDataset,
    PlanBatchSampler,
    ValDataset,
    build_noise_pool,
    epoch_plan,
    fit_linear_start,
    rng_state,
    seed_everything,
    set_rng_state,
    signal_targets,
)

log = logging.getLogger(__name__)


class CosineFactor:
    """lr factor of epoch e: cosine from 1 to `floor` over `epochs`, flat afterwards (closed form,
    so a resumed run that asks for more epochs stretches the curve instead of climbing it again)."""

    def __init__(self, epochs: int, floor: float = 0.01) -> None:
        self.epochs, self.floor = int(epochs), float(floor)

    def __call__(self, e: int) -> float:
        t = min(1.0, e / max(1, self.epochs))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimiser(model: nn.Module, config: TrainConfig, epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    """default: Adam + cosine decay to lr/100 over the run, stepped per epoch (chosen by
    measurement, see docs/research/recipe-screens.md). original: SGD 1e-3 + StepLR(100, 0.9) stepped per batch."""
    lr = config.learning_rate
    if config.recipe == "original":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, CosineFactor(epochs))


class Run:
    """One training run: the model, its optimiser and data (`build`), where it stands (`restore`,
    the resume state of last.pt), and an epoch's steps."""

    def __init__(
        self,
        data: ForwardData,
        out: Path,
        config: TrainConfig,
        cancel: CancelToken,
        rank: int,
        world: int,
        device: torch.device,
        loaded: LoadedCheckpoint | None,
    ) -> None:
        self.data, self.out, self.config, self.cancel = data, out, config, cancel
        self.rank, self.world, self.device, self.loaded = rank, world, device, loaded
        self.resume_state = loaded.resume if loaded is not None else None
        self.epochs = config.epochs
        self.history: list[dict[str, Any]] = []
        self.best_val: float | None = None
        self.best_epoch: int | None = None
        self.epoch, self.start_batch = 0, 0
        self.sums = {p: [0.0, 0] for p in PHASES}
        self.last_losses: dict[str, Any] | None = None
        self.weights = (config.s1_weight, 1.0, config.s3_weight)
        self.clip = config.clip if config.recipe != "original" else 0.0
        self.skip = tuple(p for p, w in enumerate(self.weights) if w == 0)
        self.interleave = config.recipe != "original"

    # ------------------------------------------------------------------ building

    def build(self) -> Job[None]:
        config, device = self.config, self.device
        seed_everything(config.seed)  # before the model is built (the original seeded afterwards)
        self.model, self.init, self.init_info = self._initial_model()
        self.model.to(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.amp = autocast_dtype(device, config.precision)
        if self.amp is torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
            log.warning(
                "--precision bf16 on a CPU without bf16 instructions (%s): PyTorch emulates "
                "it, measured ~37× slower than fp32 here; use --precision fp32",
                torch.backends.cpu.get_cpu_capability(),
            )
        self.opt, self.sched = make_optimiser(self.model, config, self.epochs)
        yield from self._datasets()
        yield from self._networks()
        self._loaders()
        self.n_batches = len(self._plan(0))
        self.total = self.epochs * self.n_batches
        # the default recipe ramps up over --warmup batches, a short run over its first tenth
        self.warmup = 0 if config.recipe == "original" else min(config.warmup, max(1, self.total // 10))
        self.plan_config = {k: to_jsonable(getattr(config, k)) for k in PLAN_FIELDS}
        self.plan_config["epochs"] = self.epochs  # a resume without --epochs keeps it

    def _initial_model(self) -> tuple[nn.Module, LoadedCheckpoint | None, dict[str, Any] | None]:
        """A fresh network, --init's weights or the stopped run's."""
        config, model = self.config, UDenoiseNet()
        if self.resume_state is not None:
            model.load_state_dict(self.loaded.model.state_dict())
            return model, None, self.resume_state.get("init")
        if config.init is None:
            return model, None, None
        init = load_checkpoint(config.init)
        model.load_state_dict(init.model.state_dict())
        info = {"path": str(Path(init.path).resolve()), "kind": init.kind, "name": str(config.init)}
        init_norm = init.metadata.get("normalisation")
        if init_norm and init_norm.get("method") != self.data.normalisation.get("method"):
            note = (
                f"--init {config.init}: trained on {init_norm.get('method')} normalised data, "
                f"this forward folder is {self.data.normalisation.get('method')}; fine-tuning will "
                "have to adapt to the other intensity scale"
            )
            log.warning(note)
            warnings.warn(note, UserWarning, stacklevel=5)
        return model, init, info

    def _datasets(self) -> Job[None]:
        """The pairs (fixed, or drawn fresh every epoch from a noise pool) and their targets."""
        config, data = self.config, self.data
        pool = coef = self.fresh_s2 = None
        if config.fresh_noise:
            sched_info = data.schedule
            if not sched_info or sched_info.get("beta") is None:
                raise InputError(data.folder, "--fresh-noise needs the schedule in forward.json")
            coef = schedule_coefficients(float(sched_info["beta"]), int(sched_info["steps"]))
            cache = self.out / ".cache" / f"rank{self.rank}"  # each rank its own: no two writers of one file
            pool = yield from build_noise_pool(data, cache, config.max_shift, self.cancel)
            self.fresh_s2 = data.counts["particles"] * (int(sched_info["steps"]) - int(sched_info["start"]))
        self.targets, noise_scale = signal_targets(data) if config.s2_target == "signal" else (None, 1.0)
        self.dataset = PairDataset(
            data, augment=config.augment, pool=pool, coefficients=coef, targets=self.targets, noise_scale=noise_scale
        )

    def _networks(self) -> Job[None]:
        """D = H∗x + U(x) with H the closed-form linear solution (see linear.py), or U alone;
        wrapped for DDP when there are several ranks."""
        config, transfer = self.config, None
        if self.resume_state is not None:
            transfer = self.loaded.metadata.get("linear_transfer")
        elif self.init is not None:
            transfer = self.init.metadata.get("linear_transfer")
        elif config.linear_start:
            yield Progress(0, None, "fitting the linear start on the training pairs")
            transfer = fit_linear_start(self.dataset, self.data, config.seed, self.weights, self.fresh_s2)
            zero_output_layer(self.model)
        self.transfer = transfer
        self.full: nn.Module = LinearPlusNet(self.model, transfer) if transfer else self.model
        self.net: nn.Module = self.full
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.full, device_ids=ids)

    def _loaders(self) -> None:
        config, device, world = self.config, self.device, self.world
        self.sampler = PlanBatchSampler(self.rank, world)
        workers = config.workers
        if workers is None:
            workers = 0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) // max(1, world) - 1))
        loader_kw: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
        if workers > 0:
            loader_kw.update(persistent_workers=True, prefetch_factor=4)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, **loader_kw)
        val_set = ValDataset(self.data, self.targets)
        val_idx = list(range(self.rank, len(val_set), world))
        self.val_loader = DataLoader(
            torch.utils.data.Subset(val_set, val_idx),
            batch_size=2 * config.batch_size,
            shuffle=False,
            num_workers=min(workers, 2),
            pin_memory=device.type == "cuda",
        )

    def _plan(self, epoch: int) -> list[np.ndarray]:
        return epoch_plan(
            self.data.counts, self.config.batch_size, self.config.seed, epoch, self.fresh_s2, self.skip, self.interleave
        )

    def restore(self) -> None:
        """Where a resumed run stands: optimiser, schedule, position, sums, history, RNG."""
        state = self.resume_state
        if state is not None:
            opt, sched = self.opt, self.sched
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            for fn in getattr(sched, "lr_lambdas", []):
                if isinstance(fn, CosineFactor) and fn.epochs != self.epochs:
                    fn.epochs = self.epochs  # --epochs changed on resume: stretch the cosine
                    for group, base in zip(opt.param_groups, sched.base_lrs):
                        group["lr"] = base * fn(sched.last_epoch)
            self.epoch, self.start_batch = int(state["epoch"]), int(state["batch"])
            self.sums = {p: [float(v[0]), int(v[1])] for p, v in state["sums"].items()}
            self.history = list(state.get("history", []))
            self.best_val, self.best_epoch = state.get("best_val"), state.get("best_epoch")
            if state.get("rng"):
                set_rng_state(state["rng"])
            if self.epoch >= self.epochs:
                raise CryoDDMError(
                    f"{self.out / 'last.pt'}: that run already finished {self.epoch} epochs; "
                    f"pass --epochs N with N > {self.epoch} to train further"
                )
        self.last_losses = self.history[-1] if self.history else None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ an epoch

    def _autocast(self) -> Any:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def train_epoch(self) -> Job[bool]:
        """The epoch's batches from `start_batch`; True when stopped mid-epoch (last.pt written)."""
        batches = self._plan(self.epoch)
        last_s1 = max((j for j, b in enumerate(batches) if b[0, 0] == S1), default=-1)
        self.sampler.set_epoch(batches, self.start_batch)
        self.net.train()
        self.t0 = time.perf_counter()
        for j, (phase_t, x, y, real) in enumerate(self.loader, start=self.start_batch):
            phase = int(phase_t[0])
            loss_value, n_real = self._step(j, phase, x, y, real, len(batches[j]))
            if self.config.recipe == "original" and (phase != S1 or j == last_s1):
                self.sched.step()  # literal: once after S1, after every S2/S3 batch
            self.sums[PHASES[phase]][0] += loss_value
            self.sums[PHASES[phase]][1] += int(n_real)
            mean_loss = loss_value / max(1.0, n_real)
            yield Progress(
                self.epoch * self.n_batches + j + 1,
                self.total,
                f"epoch {self.epoch + 1}/{self.epochs} {PHASES[phase].upper()} loss {mean_loss:.4g}",
                {
                    "epoch": self.epoch + 1,
                    "phase": PHASES[phase],
                    "batch": j + 1,
                    "batches": self.n_batches,
                    "loss": mean_loss,
                    "lr": self.opt.param_groups[0]["lr"],
                },
            )
            stop_now = agreed(self.cancel.cancelled, self.world, self.device)  # all ranks stop at the same batch
            if stop_now and j + 1 < self.n_batches:
                self.save_last(self.epoch, j + 1, self.last_losses)
                return True
        return False

    def _step(
        self, j: int, phase: int, x: torch.Tensor, y: torch.Tensor, real: torch.Tensor, n_global: int
    ) -> tuple[float, float]:
        """One optimiser step; returns the batch's summed loss (unweighted) and its real samples."""
        device, opt = self.device, self.opt
        n_real = float(real.sum())
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        real = real.to(device, non_blocking=True)
        if self.warmup:  # linear ramp over the first batches of the run, on top of the schedule
            ramp = min(1.0, (self.epoch * self.n_batches + j + 1) / self.warmup)
            for group, base in zip(opt.param_groups, self.sched.get_last_lr()):
                group["lr"] = base * ramp
        opt.zero_grad(set_to_none=True)
        with self._autocast():
            pred = self.net(x)
        loss_sum = (F.mse_loss(pred.float(), y, reduction="none").mean(dim=(1, 2, 3)) * real).sum()
        loss_value = float(loss_sum.detach())  # the one host sync per batch
        if agreed(not math.isfinite(loss_value), self.world, device):
            raise CryoDDMError(
                f"the loss became NaN/infinite at epoch {self.epoch + 1}, phase {PHASES[phase].upper()}, "
                f"batch {j + 1}: the training data or the learning rate ({opt.param_groups[0]['lr']:.3g}) "
                f"is at fault. Nothing was saved from this epoch; "
                + (
                    f"{self.out / 'last.pt'} still holds the last good state (epoch {len(self.history)})."
                    if (self.out / "last.pt").exists()
                    else "no checkpoint had been written yet."
                )
            )
        (loss_sum * (self.weights[phase] * self.world / n_global)).backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        opt.step()
        return loss_value, n_real

    def validate(self) -> dict[str, Any]:
        """The phase means over all ranks and the validation loss of the epoch."""
        import torch.distributed as dist

        totals = torch.tensor([[self.sums[p][0], self.sums[p][1]] for p in PHASES], dtype=torch.float64)
        if self.world > 1:
            totals = totals.to(self.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        losses = {p: float(totals[i, 0] / max(1.0, float(totals[i, 1]))) for i, p in enumerate(PHASES)}
        self.net.eval()
        vsum = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for vx, vy in self.val_loader:
                vx, vy = vx.to(self.device, non_blocking=True), vy.to(self.device, non_blocking=True)
                with self._autocast():
                    vp = self.full(vx)
                vsum[0] += F.mse_loss(vp.float(), vy, reduction="none").mean(dim=(1, 2, 3)).sum().double()
                vsum[1] += len(vx)
        if self.world > 1:
            dist.all_reduce(vsum)
        losses["val"] = float(vsum[0] / max(1.0, float(vsum[1])))
        if not math.isfinite(losses["val"]):
            raise CryoDDMError(
                f"the validation loss became NaN/infinite at epoch {self.epoch + 1}; "
                f"{self.out / 'last.pt'} keeps the last good state (epoch {len(self.history)})"
            )
        losses["lr"] = self.opt.param_groups[0]["lr"]
        losses["epoch"] = self.epoch + 1
        losses["seconds"] = time.perf_counter() - self.t0
        return losses

    def end_epoch(self, losses: dict[str, Any]) -> Progress:
        """Schedule, history, best, checkpoints; the epoch's Progress event."""
        if self.config.recipe != "original":
            self.sched.step()
        self.history.append(losses)
        self.last_losses = losses
        improved = self.best_val is None or losses["val"] < self.best_val
        if improved:
            self.best_val, self.best_epoch = losses["val"], self.epoch + 1
        self.epoch += 1
        self.start_batch = 0
        self.sums = {p: [0.0, 0] for p in PHASES}
        if self.rank == 0:
            self.save_last(self.epoch, 0, losses)
            if improved:
                save_checkpoint(self.out / "best.pt", self.model, self.metadata(self.epoch, losses), overwrite=True)
            self.write_history()
        return Progress(
            self.epoch * self.n_batches,
            self.total,
            f"epoch {self.epoch}/{self.epochs}: S1 {losses['s1']:.4g} S2 {losses['s2']:.4g} "
            f"S3 {losses['s3']:.4g} val {losses['val']:.4g}",
            {"epoch_end": True, "epoch": self.epoch, "losses": dict(losses)},
        )

    # ------------------------------------------------------------------ what is saved

    def metadata(self, ep: int, losses: dict[str, Any] | None) -> dict[str, Any]:
        config, data = self.config, self.data
        manifest = data.manifest or {}
        return {
            "architecture": dict(ARCHITECTURE),
            "window": data.window,
            "diameter_px": manifest.get("diameter_px"),
            "bin_factor": manifest.get("bin_factor", 1),
            "voxel_size": manifest.get("voxel_size"),
            "schedule": data.schedule,
            "normalisation": data.normalisation,
            "forward": data.summary(),
            "epoch": ep,
            "losses": losses,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "recipe": config.recipe,
            "lr": config.learning_rate,
            "fresh_noise": config.fresh_noise,
            "warmup": self.warmup,
            "clip": self.clip,
            "s2_target": config.s2_target,
            "linear_transfer": self.transfer,
            "augment": config.augment,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "phase_weights": {"s1": config.s1_weight, "s2": 1.0, "s3": config.s3_weight},
            "world_size": self.world,
            "device": str(self.device),
            "precision": str(self.amp or "fp32"),
            "init": self.init_info,
            "package_version": __version__,
        }

    def resume_payload(self, ep: int, batch: int) -> dict[str, Any]:
        return {
            "epoch": ep,
            "batch": batch,
            "sums": {p: [float(v[0]), int(v[1])] for p, v in self.sums.items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng_state(),
            "history": to_jsonable(self.history),
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "config": self.plan_config,
            "init": self.init_info,
            "world_size": self.world,
        }

    def save_last(self, ep: int, batch: int, losses: dict[str, Any] | None) -> None:
        if self.rank == 0:
            save_checkpoint(
                self.out / "last.pt",
                self.model,
                self.metadata(len(self.history), losses),
                resume=self.resume_payload(ep, batch),
                overwrite=True,
            )

    def write_history(self) -> None:
        if self.rank == 0:
            with atomic_write(self.out / HISTORY, overwrite=True) as tmp:
                tmp.write_text(
                    json.dumps(
                        to_jsonable(
                            {
                                "config": dataclasses.asdict(self.config),
                                "forward": self.data.summary(),
                                "epochs": self.history,
                            }
                        ),
                        indent=1,
                    )
                    + "\n"
                )


def _norm(v: Any) -> Any:
    return to_jsonable(v)
