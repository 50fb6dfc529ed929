"""Training: phase directions, falling loss, exact stop/resume, DDP equivalence, bad input."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from helpers.jobs import stop_when
from helpers.training import make_forward
from napari_cryoddm.checkpoint import load_checkpoint
from napari_cryoddm.d4 import d4
from napari_cryoddm.devices import resolve_device
from napari_cryoddm.errors import CryoDDMError, InputError
from napari_cryoddm.forward_layout import open_forward
from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.jobs import CancelToken, collect
from napari_cryoddm.normalise import Normalisation
from napari_cryoddm.preprocess import read_prepared
from napari_cryoddm.train import TrainConfig, train
from napari_cryoddm.train_data import (
    S1,
    S2,
    S3,
    PairDataset,
    PlanBatchSampler,
    ValDataset,
    build_noise_pool,
    epoch_plan,
    local_keys,
    recut,
)

torch.set_num_threads(1)


def UDenoiseNetSeeded(seed: int = 42) -> dict:
    from napari_cryoddm.model import UDenoiseNet

    torch.manual_seed(seed)
    return UDenoiseNet().state_dict()


@pytest.fixture
def fw(tmp_path):
    return make_forward(tmp_path, n=4, window=64, m=4)


@pytest.fixture
def small(tmp_path):
    """2 crops, 2 noise patches, T = 3: one batch of 2 per phase."""
    return make_forward(tmp_path, n=2, window=64, m=2, steps=3, start=2)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, device="cpu", workers=0)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- directions


def test_s2_loader_yields_noisier_then_cleaner(fw):
    """Every S2 sample the real loader yields is (x_k, x_{k−1}) of the known chain; val likewise."""
    data = open_forward(fw["folder"])
    n, start, steps, chains = 4, fw["start"], fw["steps"], fw["chains"]
    ds = PairDataset(data, augment=False)
    sampler = PlanBatchSampler()
    sampler.set_epoch(epoch_plan(data.counts, 5, seed=3, epoch=0))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    seen = 0
    for (_phase, x, y, _real), keys in zip(loader, sampler):
        for row, key in enumerate(keys):
            if key[0] != S2:
                continue
            i = key[1]
            k, crop = start + i // n, i % n
            np.testing.assert_array_equal(x[row, 0].numpy(), chains[crop, k])
            np.testing.assert_array_equal(y[row, 0].numpy(), chains[crop, k - 1])
            assert not np.array_equal(x[row, 0].numpy(), y[row, 0].numpy())
            seen += 1
    assert seen == (steps - start) * n
    vx, vy = ValDataset(data)[2]
    np.testing.assert_array_equal(vx[0].numpy(), chains[2, steps])
    np.testing.assert_array_equal(vy[0].numpy(), chains[2, steps - 1])


def test_epoch_plan_phases_partners_and_augmentation(fw):
    data = open_forward(fw["folder"])
    plan = epoch_plan(data.counts, 3, seed=1, epoch=0)
    blocks = epoch_plan(data.counts, 3, seed=1, epoch=0, interleave=False)
    phases = [int(b[0, 0]) for b in plan]
    assert [int(b[0, 0]) for b in blocks] == sorted(phases)  # the original's order: S1, S2, S3
    assert phases != sorted(phases)  # interleaved by default: the same batches, shuffled together
    assert sorted(map(bytes, map(np.ascontiguousarray, plan))) == sorted(map(bytes, map(np.ascontiguousarray, blocks)))
    s3 = np.concatenate([b for b in plan if b[0, 0] == S3])
    assert sorted(s3[:, 1]) == list(range(4)) and np.all(s3[:, 1] != s3[:, 2])
    assert sorted(np.concatenate([b[:, 1] for b in plan if b[0, 0] == S1])) == [0, 1, 2, 3]
    again = epoch_plan(data.counts, 3, seed=1, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))
    other = epoch_plan(data.counts, 3, seed=1, epoch=1)
    assert not all(np.array_equal(a, b) for a, b in zip(plan, other))
    # augmentation: the same flip/rotation for input and target, and not always the identity
    ds = PairDataset(data, augment=True)
    codes = set()
    for key in np.concatenate([b for b in plan if b[0, 0] == S2]):
        _, x, y, _ = ds[tuple(key)]
        i = int(key[1])
        k, crop = fw["start"] + i // 4, i % 4
        for code in range(8):
            if np.array_equal(x[0].numpy(), d4(fw["chains"][crop, k], code)):
                np.testing.assert_array_equal(y[0].numpy(), d4(fw["chains"][crop, k - 1], code))
                codes.add(code)
                break
        else:
            raise AssertionError("augmented sample is no flip/rotation of x_k")
    assert len(codes) > 1


def test_ddp_split_is_disjoint_and_complete():
    batch = np.arange(8 * 5).reshape(8, 5)
    a, b = local_keys(batch, 0, 2), local_keys(batch, 1, 2)
    assert len(a) == len(b) == 4
    assert set(a[:, 0]) | set(b[:, 0]) == set(batch[:, 0]) and not set(a[:, 0]) & set(b[:, 0])
    one = local_keys(batch[:1], 1, 2)  # a rank left empty takes part with weight 0
    assert len(one) == 1 and one[0, 4] == 0


def test_fresh_noise_chain_uses_recut_noise(tmp_path):
    """With flat noise regions every fresh pair obeys x_k = c_x·x_{k−1} + c_n·n with the
    re-cut (shifted, rotated) patch n equal to the flat value, and x_{k−1} is x_0 taken k−1 steps."""
    f = make_forward(tmp_path, n=4, window=64, m=4, constant_noise=5.0)
    data = open_forward(f["folder"])
    pool = collect(build_noise_pool(data, tmp_path / "cache"))
    flats = []
    for e in (data.manifest["noise"][0], data.manifest["noise"][-1]):  # one per micrograph
        mic = Path(data.manifest["micrographs"][e["micrograph"]]["path"])
        norm = read_prepared(mic, 1.0, Normalisation("robust")).image
        flats.append(float(norm[e["y"], e["x"]]))
    assert pool.margin == 8 and pool.patches.shape == (4, 80, 80)
    ds = PairDataset(data, augment=False, pool=pool, coefficients=f["coef"])
    cx, cn = f["coef"]["x_coef"], f["coef"]["noise_coef"]
    ks = set()
    for seed in range(12):
        xk, xprev, k = ds.fresh_chain(seed % 4, np.random.default_rng(seed))
        ks.add(k)
        assert f["start"] <= k < f["steps"]
        added = (xk - cx[k - 1] * xprev) / cn[k - 1]  # the noise patch of step k: flat
        assert min(abs(float(added.mean()) - v) for v in flats) < 1e-3 and added.std() < 1e-4
        rest = xprev - np.prod(cx[: k - 1]) * f["x0"][seed % 4]  # x_{k−1} = x_0 k−1 steps down
        assert rest.std() < 1e-4
    assert len(ks) > 1
    rng = np.random.default_rng(0)

    shifted = [recut(pool, 1, rng) for _ in range(6)]
    assert all(np.allclose(s, flats[0]) or np.allclose(s, flats[1]) for s in shifted)


# ----------------------------------------------------------------------------- training


def test_loss_falls_and_checkpoints_carry_metadata(fw, tmp_path):
    out = tmp_path / "run"
    res = collect(train(fw["folder"], out, _cfg(epochs=4)))
    h = res.history
    assert len(h) == 4 and not res.stopped
    for key in ("s1", "s2"):
        assert h[-1][key] < 0.9 * h[0][key], (key, [e[key] for e in h])
    vals = [e["val"] for e in h]
    assert all(b < a for a, b in zip(vals, vals[1:])) and vals[-1] < 0.95 * vals[0], vals
    last = load_checkpoint(out / "last.pt")
    best = load_checkpoint(out / "best.pt")
    assert last.kind == best.kind == "cryoddm"
    m = best.metadata
    assert m["window"] == 64 and m["bin_factor"] == 1.0 and m["normalisation"]["method"] == "robust"
    assert m["schedule"] == {"beta": 0.1288, "steps": 5, "start": 2}
    assert m["epoch"] == res.best_epoch and m["losses"]["val"] == pytest.approx(res.best_val)
    assert m["forward"]["stacks"]["s2_label"] == 12 and m["package_version"]
    json.dumps(m)  # JSON-safe
    assert last.resume["epoch"] == 4 and last.resume["batch"] == 0
    assert best.resume is None
    hist = json.loads((out / "history.json").read_text())
    assert [e["val"] for e in hist["epochs"]] == pytest.approx([e["val"] for e in h])


def _run_with_stop(folder, out, cfg, stop_epoch, stop_batch):
    cancel = CancelToken()
    return stop_when(
        train(folder, out, cfg, cancel),
        cancel,
        lambda ev: (
            (ev.payload.get("epoch"), ev.payload.get("batch")) == (stop_epoch, stop_batch)
            and not ev.payload.get("epoch_end")
        ),
    )


@pytest.mark.parametrize("recipe,stop", [("default", (2, 2)), ("original", (1, 1))])
def test_stop_mid_epoch_and_resume_matches_uninterrupted(small, tmp_path, recipe, stop):
    fw = small
    cfg = _cfg(epochs=2, recipe=recipe, batch_size=2)
    full = collect(train(fw["folder"], tmp_path / "full", cfg))
    res = _run_with_stop(fw["folder"], tmp_path / "cut", cfg, *stop)
    assert res.stopped and res.epochs_done == stop[0] - 1
    state = load_checkpoint(tmp_path / "cut" / "last.pt").resume
    assert (state["epoch"], state["batch"]) == (stop[0] - 1, stop[1])
    resumed = collect(train(fw["folder"], tmp_path / "cut", _cfg(epochs=2, recipe=recipe, batch_size=2, resume=True)))
    assert not resumed.stopped and len(resumed.history) == 2
    for a, b in zip(full.history, resumed.history):
        for key in ("s1", "s2", "s3", "val", "lr"):
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])
    wa = load_checkpoint(tmp_path / "full" / "last.pt").model.state_dict()
    wb = load_checkpoint(tmp_path / "cut" / "last.pt").model.state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def test_original_recipe_steps_per_batch_and_default_per_epoch(fw, tmp_path):
    fw = make_forward(tmp_path / "data", n=2, window=64, m=2, steps=4, start=2)
    orig = collect(train(fw["folder"], tmp_path / "o", _cfg(epochs=1, recipe="original", batch_size=1)))
    sched = load_checkpoint(tmp_path / "o" / "last.pt").resume["scheduler"]
    # B = 1: 2 S1 batches (one step after S1), 4 S2, 2 S3: 1 + 4 + 2 = 7 scheduler steps
    assert sched["last_epoch"] == 7 and orig.history[0]["lr"] == pytest.approx(1e-3)
    collect(train(fw["folder"], tmp_path / "d", _cfg(epochs=2, batch_size=2)))
    sched = load_checkpoint(tmp_path / "d" / "last.pt").resume["scheduler"]
    assert sched["last_epoch"] == 2


def test_original_folder_without_manifest_trains_with_minmax_metadata(tmp_path):
    f = make_forward(tmp_path, n=2, window=64, m=2, steps=3, start=2, manifest=False)
    with pytest.warns(UserWarning, match="no forward.json"):
        res = collect(train(f["folder"], tmp_path / "run", _cfg(epochs=1, batch_size=2)))
    m = load_checkpoint(res.last).metadata
    assert m["normalisation"]["method"] == "minmax" and m["schedule"] is None
    with pytest.raises(InputError, match="fresh-noise needs forward.json"):
        collect(train(f["folder"], tmp_path / "run2", _cfg(epochs=1, fresh_noise=True)))


def test_fresh_noise_training_runs_the_same_with_loader_workers(tmp_path):
    """Samples are decided by their keys, not by the process that makes them: a run with a
    loader worker process gives the same losses as one without."""
    f = make_forward(tmp_path, n=2, window=64, m=3, steps=3, start=2)
    runs = []
    for workers in (0, 1):
        res = collect(
            train(
                f["folder"], tmp_path / f"run{workers}", _cfg(epochs=1, batch_size=2, fresh_noise=True, workers=workers)
            )
        )
        assert load_checkpoint(res.last).metadata["fresh_noise"] is True
        assert not (tmp_path / f"run{workers}" / ".cache").exists()  # the re-cut noise pool is removed
        runs.append(res.history[0])
    for key in ("s1", "s2", "s3", "val"):
        assert runs[0][key] == pytest.approx(runs[1][key], rel=1e-6, abs=1e-7)


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_rank_ddp_matches_single_process(fw, tmp_path):
    """gloo, 2 spawned CPU processes, B/2 each, disjoint interleaved keys: after the 5 steps of one
    epoch the weights equal a single process at batch B within 1e-5.

    Plain SGD (the original recipe, lr 0.05 so the weights move): Adam's first steps turn the
    float rounding of near-zero gradients into ±lr updates, which would hide the comparison."""
    import torch.multiprocessing as mp

    from helpers.training import ddp_worker

    cfg = _cfg(epochs=1, batch_size=4, recipe="original", lr=0.05)
    single = collect(train(fw["folder"], tmp_path / "single", cfg))
    assert sum(1 for _ in epoch_plan(open_forward(fw["folder"]).counts, 4, 42, 0)) == 5
    mp.spawn(
        ddp_worker, args=(2, str(tmp_path / "store"), str(fw["folder"]), str(tmp_path / "ddp")), nprocs=2, join=True
    )
    wa = load_checkpoint(tmp_path / "single" / "last.pt").model.state_dict()
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    wb = ddp.model.state_dict()
    assert ddp.metadata["world_size"] == 2
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= 1e-5, diff
    start = UDenoiseNetSeeded()
    assert max(float((wa[k] - start[k]).abs().max()) for k in wa) > 1e-4  # the 5 steps moved it
    assert ddp.metadata["losses"]["val"] == pytest.approx(single.history[0]["val"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["best.pt", "history.json", "last.pt"]


# ----------------------------------------------------------------------------- bad input


def test_folder_without_phases_is_refused(tmp_path):
    (tmp_path / "empty" / "s1").mkdir(parents=True)
    with pytest.raises(InputError, match="missing s1/particles.mrcs, s2/input.mrcs.*s1/, s2/, s3/ and val/"):
        collect(train(tmp_path / "empty", tmp_path / "out", _cfg()))
    with pytest.raises(InputError, match="no such folder"):
        collect(train(tmp_path / "nope", tmp_path / "out", _cfg()))
    assert not (tmp_path / "out").exists()


def test_mismatched_stacks_are_refused(fw, tmp_path):
    folder = fw["folder"]
    write_mrc(folder / "val/label.mrcs", fw["chains"][:3, 5], overwrite=True)
    with pytest.raises(InputError, match=r"val/label.mrcs: holds 3 images but val/input.mrcs holds 4"):
        open_forward(folder)
    write_mrc(folder / "val/label.mrcs", np.zeros((4, 96, 96), np.float32), overwrite=True)
    with pytest.raises(InputError, match="different image sizes"):
        open_forward(folder)
    write_mrc(folder / "val/label.mrcs", fw["chains"][:, 5], overwrite=True)
    write_mrc(folder / "s3/noise.mrcs", fw["noise"][:1], overwrite=True)
    with pytest.raises(InputError, match="at least 2"):
        open_forward(folder)


def test_window_not_multiple_of_32_is_refused(tmp_path):
    for rel in ("s1/particles", "s2/input", "s2/label", "val/input", "val/label", "s3/noise"):
        write_mrc(tmp_path / "fw" / f"{rel}.mrcs", np.zeros((2, 48, 48), np.float32))
    with pytest.raises(InputError, match="not a multiple of 32"):
        open_forward(tmp_path / "fw")


def test_devices(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(CryoDDMError, match="cuda:7"):
        resolve_device("cuda:7") if not torch.cuda.is_available() else resolve_device("cuda:99")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CryoDDMError, match=r"there is no GPU 3; this machine has 1 \(cuda:0\)"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(CryoDDMError, match="use auto, cpu"):
        resolve_device("tpu")


def test_nonexistent_gpu_fails_before_writing(fw, tmp_path):
    with pytest.raises(CryoDDMError, match="cuda:5"):
        collect(train(fw["folder"], tmp_path / "out", _cfg(device="cuda:5")))
    assert not (tmp_path / "out").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fw, tmp_path):
    out = tmp_path / "run"
    collect(train(fw["folder"], out, _cfg(epochs=1)))
    before = hashlib.sha256((out / "last.pt").read_bytes()).hexdigest()
    with mrcfile.open(fw["folder"] / "s3/noise.mrcs", mode="r+") as mrc:
        mrc.data[1, 10, 10] = np.nan
    with pytest.raises(
        CryoDDMError,
        match=r"NaN/infinite at epoch 2, phase S3.*last.pt still holds "
        r"the last good state \(epoch 1\)",
    ):
        collect(train(fw["folder"], out, _cfg(epochs=2, resume=True)))
    assert hashlib.sha256((out / "last.pt").read_bytes()).hexdigest() == before


def test_existing_output_and_resume_without_checkpoint(fw, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match="no last.pt here"):
        collect(train(fw["folder"], out, _cfg(resume=True)))
    collect(train(fw["folder"], out, _cfg(epochs=1)))
    with pytest.raises(CryoDDMError, match="already holds last.pt, best.pt, history.json; pass --resume"):
        collect(train(fw["folder"], out, _cfg(epochs=1)))
    with pytest.raises(CryoDDMError, match="already finished 1 epochs"):
        collect(train(fw["folder"], out, _cfg(epochs=1, resume=True)))


def test_config_validation():
    with pytest.raises(CryoDDMError, match="--epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(CryoDDMError, match="recipe"):
        TrainConfig(recipe="fast")
    with pytest.raises(CryoDDMError, match="--lr"):
        TrainConfig(lr=-1.0)


# ----------------------------------------------------------------------------- CLI


def test_cli_trains_and_reports_errors(fw, tmp_path, capsys):
    from napari_cryoddm.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "train",
            str(fw["folder"]),
            "-o",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--no-augment",
            "--seed",
            "7",
        ]
    )
    assert rc == 0 and (out / "last.pt").is_file() and (out / "best.pt").is_file()
    text = capsys.readouterr().out
    assert "epoch 1: S1" in text and "best:" in text
    meta = load_checkpoint(out / "last.pt").metadata
    assert meta["seed"] == 7 and meta["augment"] is False
    rc = main(["train", str(tmp_path / "missing"), "-o", str(tmp_path / "x")])
    assert rc == 2 and "no such folder" in capsys.readouterr().err


def test_init_from_an_original_pth_fine_tunes_from_its_weights(small, tmp_path, monkeypatch):
    import importlib

    from helpers.training import UNET2D_SOURCE

    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "unet2d.py").write_text(UNET2D_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "orig"))
    sys.modules.pop("unet2d", None)
    torch.manual_seed(11)
    original = importlib.import_module("unet2d").UDenoiseNet()
    torch.save(original, tmp_path / "71.pth")
    sys.modules.pop("unet2d", None)
    with pytest.warns(UserWarning, match="trained on minmax normalised data"):
        res = collect(
            train(
                small["folder"],
                tmp_path / "ft",
                _cfg(epochs=1, batch_size=2, recipe="original", lr=1e-12, init=tmp_path / "71.pth"),
            )
        )
    lc = load_checkpoint(res.last)
    assert lc.metadata["init"]["kind"] == "original-module"
    for k, v in original.state_dict().items():
        torch.testing.assert_close(lc.model.state_dict()[k], v, rtol=0, atol=1e-6)


def test_init_from_another_architecture_is_refused_before_writing(small, tmp_path):
    torch.save({"model_state_dict": torch.nn.Conv2d(1, 4, 3).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(InputError, match=r"other.pth: not a CryoDDM UDenoiseNet.*missing 34 keys"):
        collect(train(small["folder"], tmp_path / "ft", _cfg(init=tmp_path / "other.pth")))
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_ddp_stop_seen_by_one_rank_stops_all_at_the_same_batch(fw, tmp_path):
    import torch.multiprocessing as mp

    from helpers.training import ddp_stop_worker

    ctx = mp.spawn(
        ddp_stop_worker,
        args=(2, str(tmp_path / "store"), str(fw["folder"]), str(tmp_path / "ddp")),
        nprocs=2,
        join=False,
    )
    import time

    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            raise AssertionError("the ranks did not agree to stop (hang)")
    state = load_checkpoint(tmp_path / "ddp" / "last.pt").resume
    assert (state["epoch"], state["batch"]) == (0, 2) and state["world_size"] == 2


# ----------------------------------------------------------------------------- phase weights


def test_phase_weight_zero_leaves_the_phase_out_and_keeps_the_others(fw):
    data = open_forward(fw["folder"])
    full = epoch_plan(data.counts, 3, seed=1, epoch=0)
    no_s1 = epoch_plan(data.counts, 3, seed=1, epoch=0, skip=(S1,))
    assert all(int(b[0, 0]) != S1 for b in no_s1)
    kept = [b for b in full if b[0, 0] != S1]
    assert len(kept) == len(no_s1) and all(np.array_equal(a, b) for a, b in zip(kept, no_s1))


def test_phase_weights_scale_the_gradient(small, tmp_path):
    """s1_weight 0 trains no S1 batch (its logged mean is 0); a weight scales the phase's step:
    with plain SGD, the one S3 batch at weight 0.5 moves the weights half as far as at 1."""
    res = collect(train(small["folder"], tmp_path / "w0", _cfg(epochs=1, batch_size=2, s1_weight=0.0)))
    assert res.history[0]["s1"] == 0.0 and res.history[0]["s2"] > 0 and res.history[0]["s3"] > 0
    meta = load_checkpoint(tmp_path / "w0" / "last.pt").metadata
    assert meta["phase_weights"] == {"s1": 0.0, "s2": 1.0, "s3": 1.0}
    moved = {}
    for w in (1.0, 0.5, 0.0):  # weight 0: S2 only, the state S3 starts from in the other runs
        out = tmp_path / f"s3_{w}"
        collect(
            train(small["folder"], out, _cfg(epochs=1, batch_size=2, recipe="original", s1_weight=0.0, s3_weight=w))
        )
        moved[w] = load_checkpoint(out / "last.pt").model.state_dict()
    step1 = torch.cat([(moved[1.0][k] - moved[0.0][k]).flatten() for k in moved[0.0]])
    step5 = torch.cat([(moved[0.5][k] - moved[0.0][k]).flatten() for k in moved[0.0]])
    assert step1.abs().max() > 0
    # float32 weights round each update, so compare the steps as vectors, not element by element
    assert float(step5.norm() / step1.norm()) == pytest.approx(0.5, abs=1e-3)
    assert float(torch.nn.functional.cosine_similarity(step5, step1, dim=0)) > 0.999
    with pytest.raises(CryoDDMError, match="s1-weight"):
        TrainConfig(s1_weight=-1.0)
