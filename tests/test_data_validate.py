"""Each validation problem of issue 4 gives a one-line message naming the file (and ``medse validate`` exits 1)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medse.cli import main
from medse.data.datasets import Case, load_dataset
from medse.data.io import read_image, write_image
from medse.data.validate import resolve_labels, validate_dataset
from medse.testing import VALIDATION_PROBLEMS, VALIDATION_WARNINGS, make_affine, make_broken_dataset, make_dataset
from medse.utils.errors import MedseError


def test_clean_dataset_has_no_problems(folder_dataset):
    root = folder_dataset()
    rep = validate_dataset(load_dataset(root))
    assert rep.errors == [] and rep.warnings == [] and rep.ok
    assert rep.label_values == [0, 1, 2, 3] and rep.num_cases == 3 and rep.num_channels == 1
    rep.raise_if_errors()  # no exception


@pytest.mark.parametrize("problem", VALIDATION_PROBLEMS)
def test_each_problem_one_line_naming_the_file(tmp_path, problem, capsys):
    root, fragment, message = make_broken_dataset(tmp_path / "ds", problem)
    rep = validate_dataset(load_dataset(root))
    assert len(rep.errors) == 1, rep.errors
    err = rep.errors[0]
    assert "\n" not in err
    assert fragment in err and message in err, err
    with pytest.raises(MedseError) as e:
        rep.raise_if_errors()
    assert str(e.value).startswith("dataset validation failed with 1 error:") and fragment in str(e.value)
    assert "\n" not in str(e.value)
    # the CLI prints the same line and exits 1
    assert main(["validate", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"error: {err}" in out and out[-1].endswith("1 error(s), 0 warning(s)")


def test_clean_declared_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", n_cases=4)
    spec = load_dataset(root)
    assert spec.labels == {"background": 0, "l1": 1, "l2": 2, "l3": 3} and spec.channel_names == ["image"]
    rep = validate_dataset(spec)
    assert rep.ok and rep.warnings == []


def test_empty_label_is_a_warning(folder_dataset):
    root = folder_dataset()
    lab = read_image(root / "labels" / "c02.nii.gz")
    write_image(np.zeros_like(lab.array), lab.affine, root / "labels" / "c02.nii.gz")
    rep = validate_dataset(load_dataset(root))
    assert rep.errors == []
    assert len(rep.warnings) == 1 and "c02.nii.gz: empty label map" in rep.warnings[0]
    assert main(["validate", str(root)]) == 0


def test_duplicate_case_ids(folder_dataset):
    spec = load_dataset(folder_dataset())
    spec.cases.append(Case("c00", list(spec.cases[0].images), spec.cases[0].label))
    rep = validate_dataset(spec)
    assert len(rep.errors) == 1 and "duplicate case ID 'c00' (2 cases)" in rep.errors[0]
    assert str(spec.source) in rep.errors[0]


def test_channel_mismatch_between_channels(tmp_path):
    root = tmp_path / "ds"
    a1, a2 = make_affine("ras"), make_affine("lps")
    rng = np.random.default_rng(0)
    write_image(rng.normal(size=(6, 6, 6)).astype(np.float32), a1, root / "images" / "p_0000.nii.gz")
    write_image(rng.normal(size=(6, 6, 6)).astype(np.float32), a2, root / "images" / "p_0001.nii.gz")
    write_image(np.ones((6, 6, 6), np.uint8), a1, root / "labels" / "p.nii.gz")
    rep = validate_dataset(load_dataset(root))
    assert len(rep.errors) == 1 and "p_0001.nii.gz: affine differs from the case's first channel" in rep.errors[0]


def test_labels_found_when_none_declared_and_pinning(folder_dataset):
    root = folder_dataset(n_labels=3)
    spec = load_dataset(root)
    assert spec.labels == {}
    rep = validate_dataset(spec)
    assert rep.label_values == [0, 1, 2]
    assert resolve_labels(spec, rep) == {"background": 0, "label_1": 1, "label_2": 2}
    assert resolve_labels(spec, rep, pin={"x": 1, "y": 2}) == {"background": 0, "x": 1, "y": 2}
    # a pinned label set is checked: value 2 is outside {0, 1}
    rep2 = validate_dataset(spec, labels={"background": 0, "x": 1})
    assert len(rep2.errors) == 3 and all("label values [2]" in e for e in rep2.errors)


def test_many_errors_summarised(folder_dataset):
    root = folder_dataset(n_cases=6)
    for i in range(6):
        (root / "labels" / f"c{i:02d}.nii.gz").unlink()
    rep = validate_dataset(load_dataset(root))
    assert len(rep.errors) == 6
    with pytest.raises(MedseError, match=r"failed with 6 errors: .*; \.\.\. and 1 more$"):
        rep.raise_if_errors()
    assert validate_dataset(load_dataset(root), check_labels=False).errors == []


def test_4d_label(folder_dataset):
    root = folder_dataset()
    lab = read_image(root / "labels" / "c00.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([lab.array] * 2, -1), lab.affine), str(root / "labels" / "c00.nii.gz"))
    rep = validate_dataset(load_dataset(root))
    assert len(rep.errors) == 1 and "labels/c00.nii.gz: 4D label map" in rep.errors[0]


def test_nifti_without_orientation_is_a_warning(folder_dataset):
    root = folder_dataset()
    img = nib.load(str(root / "images" / "c00.nii.gz"))
    bare = nib.Nifti1Image(np.asarray(img.dataobj), None)
    bare.set_qform(None, code=0)
    bare.set_sform(None, code=0)
    nib.save(bare, str(root / "images" / "c00.nii.gz"))
    rep = validate_dataset(load_dataset(root), check_labels=False)
    assert rep.errors == [] and len(rep.warnings) == 1 and "c00.nii.gz: no qform/sform" in rep.warnings[0]


def test_broken_dataset_fixture(broken_dataset):
    path, fragment, message = broken_dataset
    errors = validate_dataset(load_dataset(path)).errors
    assert len(errors) == 1 and fragment in errors[0] and message in errors[0]


@pytest.mark.parametrize("problem", VALIDATION_WARNINGS)
def test_nonfinite_voxels_are_a_warning_unless_strict(tmp_path, problem, capsys):
    root, fragment, message = make_broken_dataset(tmp_path / "ds", problem)
    rep = validate_dataset(load_dataset(root))
    assert rep.errors == [] and len(rep.warnings) == 1
    assert fragment in rep.warnings[0] and message in rep.warnings[0] and "replaced" in rep.warnings[0]
    assert main(["validate", str(root)]) == 0
    assert any(ln.startswith("warning: ") and fragment in ln for ln in capsys.readouterr().out.splitlines())
    strict = validate_dataset(load_dataset(root), nonfinite="error")
    assert len(strict.errors) == 1 and fragment in strict.errors[0] and message in strict.errors[0]
    assert strict.warnings == []


def test_image_without_any_finite_voxel_is_an_error(folder_dataset):
    root = folder_dataset()
    img = read_image(root / "images" / "c01.nii.gz")
    write_image(np.full(img.array.shape, np.nan, np.float32), img.affine, root / "images" / "c01.nii.gz")
    rep = validate_dataset(load_dataset(root))
    assert len(rep.errors) == 1 and "c01.nii.gz" in rep.errors[0] and "without any finite voxel" in rep.errors[0]
