"""dask.distributed prediction: same outputs as one process, failures reported, bad scheduler."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from napari_cryoddm import distributed as dist
from napari_cryoddm.checkpoint import save_checkpoint
from napari_cryoddm.errors import CryoDDMError
from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.jobs import collect
from napari_cryoddm.model import UDenoiseNet
from napari_cryoddm.normalise import Normalisation
from napari_cryoddm.predict import PredictConfig, predict_files, predict_one_file

distributed = pytest.importorskip("distributed")
import cloudpickle  # noqa: E402

# worker processes cannot import this test module: ship its fault plugin by value
cloudpickle.register_pickle_by_value(__import__(__name__))

CFG = dict(device="cpu", tile=480, overlap=192, channels_last=False, threads=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "m.pt", UDenoiseNet(), {"normalisation": Normalisation().to_dict(), "bin_factor": 1})
    rng = np.random.default_rng(0)
    (root / "in").mkdir()
    for i, shape in enumerate([(64, 64), (48, 80), (70, 50), (64, 96)]):
        write_mrc(root / "in" / f"m{i}.mrc", rng.normal(10, 2, shape).astype(np.float32), voxel_size=1.5)
    return root, ckpt


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client, LocalCluster

    # one task per worker at a time (a dying worker takes only its own task with it), and a task
    # that killed two workers is given up (KilledWorker) rather than retried three times
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}),
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl,
        Client(cl) as c,
    ):
        c.register_plugin(dist._device_plugin(["cpu"], 1))
        yield c


def _kill_on(name: str, once_marker: str | None = None):
    """`predict_one_file` as it is, except that the worker process dies mid-task (as under the OOM
    killer) on the micrograph called `name` — only the first time when `once_marker` is given."""

    def killing(pm, rt, src: Path, *args, **kwargs):
        if Path(src).name == name and not (once_marker and os.path.exists(once_marker)):
            if once_marker:
                Path(once_marker).touch()
            os._exit(1)
        return predict_one_file(pm, rt, src, *args, **kwargs)

    return killing


class _FaultPlugin(distributed.WorkerPlugin):
    """Swaps the `predict_one_file` each worker's task calls for `_kill_on(...)`; removing the
    plugin puts the real one back."""

    name = "cryoddm-test-fault"

    def __init__(self, victim: str, once_marker: str | None = None) -> None:
        self.victim, self.once_marker = victim, once_marker

    def setup(self, worker) -> None:
        dist.predict_one_file = _kill_on(self.victim, self.once_marker)

    def teardown(self, worker) -> None:
        dist.predict_one_file = predict_one_file


def _set_allowed_failures(n: int, dask_scheduler=None) -> int:
    """On the scheduler: how many worker deaths a task may cause before KilledWorker; the old value."""
    before = dask_scheduler.allowed_failures
    dask_scheduler.allowed_failures = n
    return before


@contextlib.contextmanager
def _faulty(client, plugin: _FaultPlugin):
    """Run with `plugin` on every worker (those dask restarts after a death too), then without."""
    client.register_plugin(plugin)
    try:
        yield
    finally:
        client.unregister_worker_plugin(plugin.name)


@pytest.mark.slow
def test_local_cluster_of_two_workers_matches_single_process(setup, client, tmp_path):
    root, ckpt = setup
    torch.set_num_threads(1)
    single = collect(predict_files(ckpt, root / "in", tmp_path / "single", PredictConfig(**CFG)))
    res = collect(dist.predict_distributed(ckpt, root / "in", tmp_path / "dask", PredictConfig(**CFG), client=client))
    assert len(res.written) == 4 and not res.failed and len(single.written) == 4
    for p in sorted((root / "in").iterdir()):
        a = mrcfile.read(tmp_path / "single" / p.name)
        b = mrcfile.read(tmp_path / "dask" / p.name)
        np.testing.assert_array_equal(a, b)
        with mrcfile.open(tmp_path / "dask" / p.name) as m:
            assert m.voxel_size.x == pytest.approx(1.5)
    again = collect(dist.predict_distributed(ckpt, root / "in", tmp_path / "dask", PredictConfig(**CFG), client=client))
    assert len(again.skipped) == 4 and not again.written


@pytest.mark.slow
def test_bad_micrograph_and_killed_worker_are_reported_others_finish(setup, client, tmp_path):
    root, ckpt = setup
    folder = tmp_path / "in"
    folder.mkdir()
    for p in (root / "in").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    bad = mrcfile.read(folder / "m1.mrc").copy()
    bad[3, 3] = np.nan
    write_mrc(folder / "m1.mrc", bad, voxel_size=1.5, overwrite=True)
    # A micrograph that kills every worker it lands on: rescheduled by dask, then reported.
    with _faulty(client, _FaultPlugin("m2.mrc")):
        res = collect(dist.predict_distributed(ckpt, folder, tmp_path / "out", PredictConfig(**CFG), client=client))
    failed = {Path(p).name: why for p, why in res.failed}
    assert sorted(p.name for p in res.written) == ["m0.mrc", "m3.mrc"], res.failed
    assert "NaN" in failed["m1.mrc"] and "m1.mrc" in failed["m1.mrc"]
    assert "KilledWorker" in failed["m2.mrc"]
    assert not (tmp_path / "out" / "m2.mrc").exists()


@pytest.mark.slow
def test_killed_worker_once_is_retried(setup, client, tmp_path):
    """dask gives up on m3 at the first worker it kills (no failures allowed here), so only
    predict_distributed's own second chance can finish it."""
    root, ckpt = setup
    before = client.run_on_scheduler(_set_allowed_failures, 0)
    try:
        with _faulty(client, _FaultPlugin("m3.mrc", str(tmp_path / "killed-once"))):
            res = collect(
                dist.predict_distributed(ckpt, root / "in", tmp_path / "out", PredictConfig(**CFG), client=client)
            )
    finally:
        client.run_on_scheduler(_set_allowed_failures, before)
    assert (tmp_path / "killed-once").exists()  # a worker did die on m3.mrc …
    assert sorted(p.name for p in res.written) == ["m0.mrc", "m1.mrc", "m2.mrc", "m3.mrc"], (
        res.failed
    )  # … and it was retried
    assert not res.failed


def test_unreachable_scheduler_is_a_clear_error(setup, tmp_path):
    root, ckpt = setup
    cfg = PredictConfig(**CFG, scheduler="tcp://127.0.0.1:9")
    with pytest.raises(CryoDDMError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9"):
        dist.connect(cfg, timeout="2s")


def test_gpu_list_is_checked():
    assert dist.parse_gpus("0,1, 3") == [0, 1, 3]
    with pytest.raises(CryoDDMError, match="--gpus"):
        dist.parse_gpus("0,a")
    with pytest.raises(CryoDDMError, match="--gpus"):
        dist.parse_gpus("1,1")
    if not torch.cuda.is_available():
        with pytest.raises(CryoDDMError, match="CUDA GPU"):
            dist.connect(PredictConfig(gpus="0"))


@pytest.mark.slow
def test_cli_workers_starts_a_local_cluster(setup, tmp_path, capsys):
    from napari_cryoddm.cli import main

    root, ckpt = setup
    argv = [
        "predict",
        str(ckpt),
        str(root / "in"),
        "-o",
        str(tmp_path / "out"),
        "--workers",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--tile",
        "480",
        "--no-channels-last",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m0.mrc", "m1.mrc", "m2.mrc", "m3.mrc"]
    assert "4 denoised" in capsys.readouterr().err
    assert main(argv[:-7] + ["--workers", "2", "--gpus", "0"]) == 2  # one of the three only


def test_a_recomputed_task_finds_its_own_output_and_does_not_fail(tmp_path):
    """dask re-runs a finished task whose result died with a worker: the output it wrote is kept
    (outputs are atomic) and reported as written, not as 'already exists'."""
    dst = tmp_path / "m0.mrc"
    write_mrc(dst, np.zeros((8, 8), np.float32))
    before = dst.read_bytes()
    out = dist._task({"token": "t"}, str(tmp_path / "missing.mrc"), str(dst), dict(CFG))
    assert out["status"] == "written" and out["output"] == str(dst)
    assert dst.read_bytes() == before
