"""Screenshots of the real napari window for each workflow step → docs/images/*.png.

Walks the sample data through the five dock widgets in one viewer, the way a user would:
File ▸ Open Sample ▸ CryoDDM stack → Noise picker (away from the sample's particles) → Forward
(micrographs, particles and noise boxes from the layers) → Train (the forward folder it just
wrote) → Predict (the checkpoint it just wrote; denoised layer beside the raw one) → cs2star
(the sample's cryoSPARC `.cs` pair; particles land as boxes on the raw micrographs).

Run it under Xvfb (a hidden viewer's screenshot is black):

    xvfb-run -a .venv/bin/python scripts/screenshots.py            # writes docs/images/
    xvfb-run -a .venv/bin/python scripts/screenshots.py --out /tmp/shots --work /tmp/walk

`tests/test_demo_viewer.py` runs the same `walk()` (without saving pictures) and checks the
results against the core functions and the sample's truth.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("CRYODDM_NAPARI_NOTHREADS", "1")  # each step finishes before the next

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "napari-cryoddm"


def _dock(viewer: Any, name: str, docks: list[Any]) -> Any:
    """Open a plugin dock widget; the previous step's dock is hidden so each picture shows one."""
    for dock in docks:
        dock.setVisible(False)
    dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    docks.append(dock_widget)
    return widget


def _process(viewer: Any) -> None:
    from qtpy.QtWidgets import QApplication
    for _ in range(3):
        QApplication.processEvents()


def open_sample(viewer: Any, sample_config: Any = None) -> None:
    """File ▸ Open Sample ▸ CryoDDM stack, or the same layers for a smaller `SampleConfig`."""
    if sample_config is None:
        viewer.open_sample(PLUGIN, "stack")
        return
    from napari_cryoddm._napari.sample_data import sample_layers

    for data, kwargs, kind in sample_layers(sample_config, "CryoDDM sample stack"):
        getattr(viewer, f"add_{kind}")(data, **kwargs)


def walk(viewer: Any, work: Path, shot: Callable[[str], None] | None = None,
         epochs: int = 1, max_noise: int = 8, sample_config: Any = None) -> dict[str, Any]:
    """Run every step in `viewer` on the sample stack; `shot(name)` after each step."""
    from napari_cryoddm._napari.layers import micrograph_layers, points_layers

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    shot = shot or (lambda name: None)
    out: dict[str, Any] = {}
    docks: list[Any] = []

    # 1. sample data: noisy stack, hidden clean signal, true particles as boxes
    open_sample(viewer, sample_config)
    raw_layer = micrograph_layers(viewer)[0]
    particles_layer = points_layers(viewer, "particles")[0]
    sample_meta = raw_layer.metadata["cryoddm"]["sample"]
    out["raw_layer"], out["particles_layer"], out["sample"] = raw_layer, particles_layer, sample_meta
    viewer.reset_view()
    _process(viewer)
    shot("01-sample")

    # 2. noise picker: boxes away from the particles layer
    picker = _dock(viewer, "Noise picker", docks)
    picker.image.value = raw_layer
    picker.unit.value = "px"
    picker.diameter.value = float(particles_layer.metadata["cryoddm"].get("diameter_px")
                                  or sample_meta["config"]["diameter"] / sample_meta["config"]["pixel_size"])
    picker.particles_layer.value = particles_layer
    picker.form["max_per_micrograph"].value = max_noise
    picker.pick_from_particles()
    noise_layer = picker.noise_layer
    if noise_layer is None or len(noise_layer.data) == 0:
        raise RuntimeError(f"the noise picker made no boxes: {picker.message.value}")
    out["noise_layer"] = noise_layer
    _process(viewer)
    shot("02-noise-picker")

    # 3. forward: everything from the layers
    forward = _dock(viewer, "Forward", docks)
    forward._micrographs.value = raw_layer
    forward._particles.value = particles_layer
    forward._noise.value = noise_layer
    forward.form["diameter"].value = float(picker.diameter_px())  # the forward form asks for it
    forward._output.value = work / "forward"
    forward.run()
    if forward.result is None:
        raise RuntimeError(f"forward did not finish: {forward._status.value}")
    out["forward"] = forward.result
    _process(viewer)
    shot("03-forward")

    # 4. train on the folder forward wrote
    train = _dock(viewer, "Train", docks)
    train._forward.value = forward.result.out
    train._out.value = work / "train"
    train.form["epochs"].value = epochs
    train.form["batch_size"].value = 8
    train.start()
    if train.result is None:
        raise RuntimeError(f"training did not finish: {train._status.value}")
    out["train"] = train.result
    checkpoint = train.result.best or train.result.last
    out["checkpoint"] = checkpoint
    _process(viewer)
    shot("04-train")

    # 5. predict with the checkpoint train wrote; the denoised stack lands beside the raw one
    predict = _dock(viewer, "Predict", docks)
    predict.model_file.value = Path(checkpoint)
    predict.layer_combo.value = raw_layer
    predict.out_dir.value = work / "denoised"
    predict.form["device"].value = "cpu"
    predict.denoise_all()
    name = predict.denoised_name(raw_layer)
    if name not in viewer.layers:
        raise RuntimeError(f"predict added no layer: {predict.status.value}")
    out["denoised_layer"] = viewer.layers[name]
    out["predict_config"] = predict.config()
    out["denoised_layer"].reset_contrast_limits()  # the layer was created before its first result
    for lay in viewer.layers:
        lay.visible = lay in (raw_layer, out["denoised_layer"])
    viewer.reset_view()
    _process(viewer)
    shot("05-predict")
    viewer.canvas.grid.enabled = False
    for lay in viewer.layers:
        lay.visible = lay is raw_layer

    # 6. cs2star: the sample's .cs pair back onto the raw micrographs
    cs = _dock(viewer, "cs2star", docks)
    cs._particles.value = Path(sample_meta["particles_cs"])
    cs._passthrough.value = [Path(sample_meta["passthrough_cs"])]
    cs._output.value = work / "cs2star" / "particles.star"
    cs.form["strip_uid"].value = True
    cs._image.value = raw_layer
    cs.run()
    if not cs.layers:
        raise RuntimeError(f"cs2star showed no particles: {cs._status.value}")
    out["cs2star_layer"] = cs.layers[0]
    out["cs2star"] = cs.results[0]
    cs.layers[0].visible = True
    viewer.reset_view()
    _process(viewer)
    shot("06-cs2star")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    p.add_argument("--work", type=Path, default=None, help="where the steps write (default: a temp dir)")
    p.add_argument("--size", default="1700x1000", help="window size WxH")
    args = p.parse_args(argv)
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        print("unset QT_QPA_PLATFORM and run under Xvfb (xvfb-run -a …): offscreen has no OpenGL",
              file=sys.stderr)
        return 2
    import napari

    work = args.work or Path(tempfile.mkdtemp(prefix="cryoddm-shots-"))
    os.environ.setdefault("CRYODDM_CACHE_DIR", str(work / "cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in args.size.split("x"))
    viewer = napari.Viewer(show=True, title="napari-cryoddm")
    viewer.window.resize(w, h)

    def shot(name: str) -> None:
        path = args.out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        print(f"wrote {path}")

    try:
        walk(viewer, work, shot)
    finally:
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
