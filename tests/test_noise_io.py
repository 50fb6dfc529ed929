"""The original program's noise coordinates text (`name x y`), both ways."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cryoddm.errors import CryoDDMError, InputError, OutputExistsError
from napari_cryoddm.io.noise import read_noise_txt, write_noise_txt


def test_reads_the_original_example_format(tmp_path):
    """CRLF endings and blank lines, as in the original's `10059_.txt`."""
    path = tmp_path / "10059_.txt"
    path.write_bytes(
        b"stack_0009_2x_dfpt.mrc 3274 2914\r\n\r\nstack_0009_2x_dfpt.mrc 100 200\r\nstack_0010_2x_dfpt.mrc 5.6 7.4\r\n"
    )
    t = read_noise_txt(path)
    assert t["micrograph"].tolist() == ["stack_0009_2x_dfpt.mrc"] * 2 + ["stack_0010_2x_dfpt.mrc"]
    assert t["x"].tolist() == [3274, 100, 6] and t["y"].tolist() == [2914, 200, 7]
    assert t["x"].dtype == np.int64


def test_round_trip_is_byte_exact_and_drops_duplicates(tmp_path):
    table = pd.DataFrame(
        {"micrograph": ["a.mrc", "a.mrc", "b.mrcs", "a.mrc"], "x": [10.4, 300, 5, 10], "y": [20.6, 40, 6, 21]}
    )
    out = write_noise_txt(tmp_path / "noise.txt", table)
    assert out.read_text() == "a.mrc 10 21\na.mrc 300 40\nb.mrcs 5 6\n"
    back = read_noise_txt(out)
    assert back.values.tolist() == [["a.mrc", 10, 21], ["a.mrc", 300, 40], ["b.mrcs", 5, 6]]
    with pytest.raises(OutputExistsError):
        write_noise_txt(out, table, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.txt"]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a.mrc 1\n", r"line 1: expected 'micrograph x y'"),
        ("a.mrc 1 2\na.mrc x 2\n", r"line 2: x and y must be numbers"),
        ("a.mrc nan 2\n", r"line 1: x and y must be finite"),
        ("\n\n", "holds no noise boxes"),
    ],
)
def test_malformed_lines_are_named(tmp_path, text, problem):
    path = tmp_path / "bad_noise.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as exc:
        read_noise_txt(path)
    assert str(path) in str(exc.value)


def test_empty_allowed_and_binary_rejected(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert len(read_noise_txt(empty, allow_empty=True)) == 0
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(InputError, match="not a text file"):
        read_noise_txt(binary)


def test_names_with_spaces_refused(tmp_path):
    with pytest.raises(CryoDDMError, match="must not be empty or contain spaces"):
        write_noise_txt(tmp_path / "n.txt", pd.DataFrame({"micrograph": ["a b.mrc"], "x": [1], "y": [2]}))
    assert not (tmp_path / "n.txt").exists()
