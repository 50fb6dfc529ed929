"""Batch prediction across processes, GPUs or a cluster with dask.distributed.

One task per micrograph; each worker rebuilds the network once from the shipped weights (3.9 MB,
so the checkpoint need not sit on a shared disk), reads its micrograph, and writes its own output
atomically (inputs and outputs must be visible to the workers, as on any cluster file system).
The client only plans, shows progress and sums up. A micrograph that fails (NaN pixels, an
unreadable file) is reported and the others carry on; a worker that dies (out of host memory,
killed by the batch system) has its task rescheduled by dask, and if it keeps killing workers it is
reported as failed. Runs where to compute:

* `gpus="0,1"`: a LocalCluster with one worker process per GPU, each pinned to its device;
* `workers=N`: a LocalCluster of N CPU worker processes, threads split between them;
* `scheduler="tcp://HOST:PORT"`: an existing cluster (e.g. dask-jobqueue on SLURM).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from .config import to_jsonable
from .errors import CryoDDMError, OutputExistsError
from .jobs import CancelToken, Job, Progress
from .predict import (
    PredictConfig,
    PredictModel,
    PredictResult,
    is_predict_output,
    plan_run,
    predict_one_file,
    resolve_device,
    runtime_for,
)

# Set in a worker process by `_DevicePlugin`; tasks read it.
_WORKER_DEVICE: str | None = None
_WORKER_THREADS: int = 0
# (token, device) → (PredictModel, Runtime): the network stays on the worker between tasks.
_CACHE: dict[tuple[str, str], tuple[PredictModel, Any]] = {}


def parse_gpus(text: str) -> list[int]:
    try:
        gpus = [int(g) for g in str(text).replace(" ", "").split(",") if g != ""]
    except ValueError:
        raise CryoDDMError(f"--gpus {text!r}: give GPU numbers separated by commas, e.g. 0,1,2") from None
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise CryoDDMError(f"--gpus {text!r}: give distinct GPU numbers separated by commas, e.g. 0,1")
    return gpus


def _device_plugin(devices: list[str], threads: int) -> Any:
    from distributed.diagnostics.plugin import WorkerPlugin

    class _DevicePlugin(WorkerPlugin):
        """Pins worker k of a LocalCluster to devices[k] (and sets its torch threads)."""

        name = "cryoddm-device"

        def __init__(self) -> None:
            self.devices, self.threads = devices, threads

        def setup(self, worker: Any) -> None:
            global _WORKER_DEVICE, _WORKER_THREADS
            try:
                index = int(worker.name)
            except (TypeError, ValueError):
                index = abs(hash(worker.name))
            _WORKER_DEVICE = self.devices[index % len(self.devices)]
            _WORKER_THREADS = self.threads

    return _DevicePlugin()


def _task(state: dict[str, Any], src: str, dst: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run on a worker: denoise one micrograph, write it, say what happened (never raise a user
    error: the client collects those as failures)."""
    config = PredictConfig(**cfg)
    if Path(dst).exists() and not config.overwrite:
        # The client submits only missing outputs, so this one was written by an earlier run of
        # this very task (complete: outputs are atomic) whose result died with its worker.
        return {
            "status": "written",
            "input": src,
            "output": dst,
            "device": "",
            "seconds": 0.0,
            "host": os.uname().nodename,
        }
    t0 = time.perf_counter()
    device_spec = _WORKER_DEVICE or config.device
    key = (state["token"], device_spec)
    try:
        if key not in _CACHE:
            import torch

            if _WORKER_THREADS:
                torch.set_num_threads(_WORKER_THREADS)
            pm = PredictModel.from_state(state)
            _CACHE.clear()
            _CACHE[key] = (pm, runtime_for(pm, config, resolve_device(device_spec)))
        pm, rt = _CACHE[key]
        out = predict_one_file(pm, rt, Path(src), Path(dst), config)
    except OutputExistsError:
        if not is_predict_output(dst):
            return {
                "status": "failed",
                "input": src,
                "error": f"{dst}: appeared meanwhile and was not written by cryoddm predict",
            }
        out = Path(dst)  # another run of the same command wrote it meanwhile: done
    except CryoDDMError as exc:
        return {"status": "failed", "input": src, "error": str(exc)}
    return {
        "status": "written",
        "input": src,
        "output": str(out),
        "device": device_spec,
        "seconds": time.perf_counter() - t0,
        "host": os.uname().nodename,
    }


def _identity(x: Any) -> Any:
    return x


def connect(config: PredictConfig, timeout: str = "10s") -> tuple[Any, Any]:
    """(client, cluster or None) for `config.scheduler`, `config.gpus` or `config.workers`."""
    from distributed import Client, LocalCluster

    if config.scheduler:
        try:
            return Client(config.scheduler, timeout=timeout), None
        except (OSError, TimeoutError, ValueError) as exc:
            raise CryoDDMError(
                f"cannot reach the dask scheduler at {config.scheduler} ({exc}); "
                "check that it is running and that the address and port are right "
                "(tcp://HOST:PORT)"
            ) from None
    if config.gpus:
        devices = [f"cuda:{g}" for g in parse_gpus(config.gpus)]
        import torch

        n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [d for d in devices if int(d.split(":")[1]) >= n_cuda]
        if missing:
            raise CryoDDMError(
                f"--gpus {config.gpus}: this machine has {n_cuda} CUDA GPU(s); {', '.join(missing)} do not exist"
            )
        threads = config.threads or 2
    elif config.workers:
        if config.workers < 1:
            raise CryoDDMError(f"--workers {config.workers}: must be ≥ 1")
        devices = ["cpu"]
        threads = config.threads or max(1, (os.cpu_count() or 1) // config.workers)
    else:
        raise CryoDDMError("distributed prediction needs --gpus, --workers or --scheduler")
    cluster = LocalCluster(
        n_workers=len(devices) if config.gpus else config.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
    )
    client = Client(cluster)
    client.register_plugin(_device_plugin(devices, threads))
    return client, cluster


def _ship(client: Any, pm: PredictModel, config: PredictConfig) -> tuple[Any, str, dict[str, Any]]:
    """(future of the weights, run token, the config as the workers get it).

    The weights travel as a task's result (not scatter): scattered data dies with the workers that
    hold it, a task's result is recomputed from its recipe when they die."""
    state = pm.state()
    state["token"] = uuid.uuid4().hex
    shared = client.submit(_identity, state, key=f"cryoddm-model-{state['token']}", pure=False)
    cfg = to_jsonable(config)
    cfg.update(gpus="", workers=0, scheduler="", prefetch=False)  # a worker predicts in-process
    return shared, state["token"], cfg


def predict_distributed(
    model: PredictModel | Any,
    inputs: Any,
    out_dir: str | os.PathLike[str],
    config: PredictConfig | None = None,
    cancel: CancelToken | None = None,
    client: Any = None,
) -> Job[PredictResult]:
    """`predict_files` over a dask cluster: same outputs, same skip/resume rules, same result."""
    from distributed import as_completed

    config = config or PredictConfig()
    cancel = cancel or CancelToken()
    out_dir = Path(out_dir)
    # the checkpoint is validated here, before any worker starts
    pm, result, todo, total = plan_run(model, inputs, out_dir, config)
    done = len(result.skipped)
    yield Progress(done, total, f"{done} already done" if done else "starting workers")
    if not todo:
        return result
    own = client is None
    cluster = None
    if own:
        client, cluster = connect(config)
    t0 = time.perf_counter()
    try:
        shared, token, cfg = _ship(client, pm, config)
        # The client feeds the cluster one task per worker thread and submits the next as one
        # finishes: a worker that dies then takes only its own micrograph with it (dask sends
        # tasks with a dependency to workers eagerly), Stop has little to cancel, and a run of
        # 10,000 micrographs does not sit in the scheduler's memory.
        workers = client.scheduler_info().get("workers", {})
        slots = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        queue = list(todo)
        in_flight: dict[Any, tuple[Path, Path]] = {}
        stream = as_completed()
        retried: set[Path] = set()

        def submit_next() -> None:
            src, dst = queue.pop(0)
            # a retry gets its own key: under the old one the scheduler may still hold the failure
            again = "-again" if src in retried else ""
            fut = client.submit(
                _task, shared, str(src), str(dst), cfg, pure=False, key=f"cryoddm-predict-{dst.stem}-{token[:8]}{again}"
            )
            in_flight[fut] = (src, dst)
            stream.add(fut)

        for _ in range(min(slots, len(queue))):
            submit_next()
        yield Progress(done, total, f"{len(todo)} micrographs on {len(workers)} workers")
        for fut in stream:
            src, dst = in_flight.pop(fut)
            try:
                out = fut.result()
                fut.release()  # a result left on a worker is recomputed if that worker dies
            except Exception as exc:  # noqa: BLE001 - KilledWorker, a worker's bug: report, go on
                fut.release()
                if type(exc).__name__ == "KilledWorker" and src not in retried and not cancel.cancelled:
                    # a micrograph queued on a worker that another one killed is charged with
                    # that death too: give each one second chance, so only the culprit fails
                    retried.add(src)
                    queue.insert(0, (src, dst))
                    submit_next()
                    continue
                out = {"status": "failed", "error": f"{src}: {type(exc).__name__}: {exc}"}
            _record(result, src, out)
            done += 1
            if cancel.cancelled:
                client.cancel(list(in_flight))
                break
            if queue:
                submit_next()
            yield Progress(done, total, src.name, {"input": str(src), "output": str(dst), **out})
    finally:
        result.seconds = time.perf_counter() - t0
        if own:
            _close(client, cluster)
    return result


def _record(result: PredictResult, src: Path, out: dict[str, Any]) -> None:
    """A worker's answer for one micrograph, into the run's result."""
    if out["status"] == "written":
        result.written.append(Path(out["output"]))
    else:
        result.failed.append((src, out["error"]))


def _close(client: Any, cluster: Any) -> None:
    client.close()
    if cluster is not None:
        cluster.close()
