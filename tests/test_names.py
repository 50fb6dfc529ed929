"""Micrograph names: stems and the name matching that attaches coordinates to micrographs."""

from __future__ import annotations

import pytest

from napari_cryoddm.names import match_names, micrograph_stem


@pytest.mark.parametrize(
    "name, stem",
    [
        ("a/b/stack_0001.mrcs.gz", "stack_0001"),
        ("stack_0001.mrc", "stack_0001"),
        ("MotionCorr/job002/Micrographs/0003.mrc", "0003"),
        (">J1/imported/0042_patch_aligned.mrc", "0042_patch_aligned"),
        ("C:\\data\\x.MRC", "x"),
        ("TcdA1-0018_frames_sum.cbox", "TcdA1-0018_frames_sum"),
        ("Ucsf_stack_1142_DW_autopick.star", "Ucsf_stack_1142_DW_autopick"),
        ("noise.mrc.txt", "noise"),
        (".mrc", ".mrc"),
    ],
)
def test_stems(name, stem):
    assert micrograph_stem(name) == stem


def test_match_exact_stem_then_relion_suffix():
    mics = ["Ucsf_stack_1142_DW.mrc", "mic_1.mrc", "mic_10.mrc"]
    m = match_names(
        ["Micrographs/mic_10.mrc", "Ucsf_stack_1142_DW_autopick", "mic_1_manualpick", "other.mrc", "mic_1.mrc"], mics
    )
    assert m.mapping == {
        "Micrographs/mic_10.mrc": 2,
        "Ucsf_stack_1142_DW_autopick": 0,
        "mic_1_manualpick": 1,
        "mic_1.mrc": 1,
    }
    assert m.unmatched == ["other.mrc"]
    assert "other.mrc" in m.describe_mismatch() and "Ucsf_stack_1142_DW.mrc" in m.describe_mismatch()


def test_longest_stem_wins_for_suffixes():
    m = match_names(["mic_10_autopick"], ["mic_1.mrc", "mic_10.mrc"])
    assert m.mapping == {"mic_10_autopick": 1}


def test_particle_stack_image_names_do_not_match_micrographs():
    m = match_names(["mic_1.mrc"], ["000001@mic_1.mrcs"])
    assert m.unmatched == ["mic_1.mrc"]
