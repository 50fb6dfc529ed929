"""`cryoddm info`: header facts of real files, JSON, FEI extended headers, bad files reported."""

from __future__ import annotations

import json
import subprocess
import sys

import mrcfile
import numpy as np

from napari_cryoddm import __version__
from napari_cryoddm.cli import main


def test_info_real_files_text(real_data, capsys):
    rc = main(
        [
            "info",
            str(real_data / "full_size"),
            str(real_data / "particle_stacks/relion31.mrcs"),
            str(real_data / "particle_stacks/empiar_10076_7.mrc"),
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(out) == 4
    assert out[0].endswith(
        "epu2.9_example.mrc: image 4096×4096 (rows×columns) (mode 6 uint16), voxel "
        "size 0.6666 Å/px, extended header FEI2 (909312 bytes)"
    )
    # the fei-extended micrograph is 3838 rows by 3710 columns: the order is named
    assert "image 3838×3710 (rows×columns)" in out[1] and "0.8538 Å/px" in out[1]
    assert "FEI1 (786432 bytes)" in out[1]
    assert "stack 5×256×256 (images×rows×columns) (mode 2 float32), voxel size 1.0000 Å/px" in out[2]
    assert "check the real pixel size" in out[2]  # 1.0 Å/px: the writers' placeholder, flagged
    assert "volume 7×320×320 (sections×rows×columns)" in out[3] and "voxel size unknown" in out[3]


def test_info_extended_fei_fields(real_data, capsys):
    assert main(["info", "--extended", str(real_data / "full_size/epu2.9_example.mrc")]) == 0
    out = capsys.readouterr().out
    for piece in (
        "HT 300 kV",
        "dose 41.17 e/Å²",
        "pixel size 0.6666 Å",
        "defocus 1.815 µm underfocus",
        "applied defocus 2.2 µm underfocus",
        "magnification 120,000×",
        "camera BM-Falcon",
        "EPU 2.9.0.1519",
    ):
        assert piece in out
    # EPU 1.2 writes both defocus fields negative, EPU 2.9 the measured one positive: one sign here
    assert main(["info", "--extended", str(real_data / "full_size/fei-extended.mrc")]) == 0
    out = capsys.readouterr().out
    assert "defocus 0.9066 µm underfocus" in out and "applied defocus 0.8 µm underfocus" in out
    assert "-" not in out.split("defocus", 1)[1].split(",")[0]


def test_info_json_and_gzip(tmp_path, capsys):
    import gzip

    path = tmp_path / "s.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((3, 8, 10), np.int16))
        m.voxel_size = 1.23
        m.header.ispg = 0
    gz = tmp_path / "s.mrcs.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert main(["info", "--json", str(gz)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["shape"] == [3, 8, 10] and d["mode"] == 1 and d["is_stack"] and d["compressed"]
    assert abs(d["voxel_size"] - 1.23) < 1e-6 and d["exttyp"] == ""


def test_info_bad_files_reported_others_shown(tmp_path, real_data, capsys):
    bad = tmp_path / "bad.mrc"
    bad.write_text("not an mrc\n" * 200)
    rc = main(["info", str(bad), str(tmp_path / "absent.mrc"), str(real_data / "micrographs/Ucsf_stack_1142_DW.mrc")])
    captured = capsys.readouterr()
    assert rc == 2
    assert "Ucsf_stack_1142_DW.mrc: image 927×959" in captured.out
    assert f"{bad}: not an MRC file" in captured.err
    assert "absent.mrc: no such file" in captured.err
    assert "Traceback" not in captured.err


def test_module_entry_point_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "napari_cryoddm", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"napari-cryoddm {__version__}"
