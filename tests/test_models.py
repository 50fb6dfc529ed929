"""Built-in models by name: resolution, a clear error when the install lacks the file, and a
file of the same name in the working directory taking precedence."""

from __future__ import annotations

import pytest

from napari_cryoddm import models
from napari_cryoddm.checkpoint import load_checkpoint, save_checkpoint
from napari_cryoddm.errors import CryoDDMError
from napari_cryoddm.model import UDenoiseNet


def test_missing_builtin_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(models.BUILTIN, "sample", "not-installed.pt")
    with pytest.raises(CryoDDMError, match="built-in model 'sample' is missing from this install"):
        load_checkpoint("sample")
    assert "sample" not in models.available()
    with pytest.raises(CryoDDMError, match="no built-in model 'unet'"):
        models.builtin_path("unet")


def test_builtin_resolves_to_the_package_file(monkeypatch, tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    save_checkpoint(pkg / "sample.pt", UDenoiseNet(), {"schedule": {"beta": 0.1288, "steps": 5, "start": 4}})
    monkeypatch.setattr(models.resources, "files", lambda _name: pkg)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample").mkdir()  # a folder named like the model does not hide it
    loaded = load_checkpoint("sample")
    assert loaded.path == pkg / "sample.pt"
    assert loaded.metadata["schedule"]["start"] == 4
    assert models.available() == ["sample"]


def test_a_file_named_like_the_model_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "sample", UDenoiseNet(), {"note": "mine"})
    assert load_checkpoint("sample").metadata["note"] == "mine"
