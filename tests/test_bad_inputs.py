"""The bad-input table: every command, ordinary mistakes and damaged files (docs/errors.md).

Each case runs the ``slicreg`` command in-process on a shared folder of small files and asserts

- exit status 2,
- exactly one error line ``slicreg <command>: error: ...`` that names the file or argument (the case's pattern),
  and no traceback,
- every file in the folder byte-identical afterwards, and no new file (no output, no temporary left behind).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.cli import main

AFF = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (24, 20, 16)
REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "weights" / "slicreg-cohort-v3"


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFF) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def _ct() -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    ct = np.full(SHAPE, -1000.0, np.float32)
    body = x ** 2 + y ** 2 < 0.7
    ct[body] = 30.0
    ct[(x - 0.2) ** 2 + y ** 2 + z ** 2 < 0.1] = 60.0
    ct[(x + 0.3) ** 2 + (y - 0.1) ** 2 + z ** 2 < 0.05] = 300.0
    return ct


def _labels() -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    lab = np.zeros(SHAPE, np.uint8)
    lab[(x - 0.2) ** 2 + y ** 2 + z ** 2 < 0.1] = 6
    lab[(x + 0.3) ** 2 + (y - 0.1) ** 2 + z ** 2 < 0.05] = 1
    return lab


def _corrupt_header(path: Path, shape: tuple[int, ...], *, source: Path, compress: bool) -> None:
    raw = bytearray(gzip.decompress(source.read_bytes()))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    header.set_data_shape(shape)
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)) if compress else bytes(raw))


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """The folder of inputs every case reads (and must leave as it was)."""
    root = tmp_path_factory.mktemp("bad")
    ct = _ct()
    _save(root / "ct.nii.gz", ct)
    _save(root / "ct2.nii.gz", np.roll(ct, 1, axis=0))
    _save(root / "ct_3mm.nii.gz", ct, np.diag([3.0, 3.0, 3.0, 1.0]))
    _save(root / "labels.nii.gz", _labels())
    _save(root / "labels_float.nii.gz", _labels().astype(np.float32) + 0.5)
    _save(root / "labels_negative.nii.gz", ct.astype(np.int16))
    _save(root / "nan.nii.gz", np.where(ct > 0, np.nan, ct).astype(np.float32))
    _save(root / "flat2d.nii.gz", ct[:, :, 0].copy())
    _save(root / "image4d.nii.gz", np.stack([ct, ct], axis=-1))
    _save(root / "field.nii.gz", np.zeros((*SHAPE, 3), np.float32))
    _save(root / "field_small.nii.gz", np.zeros((10, 10, 10, 3), np.float32))
    _save(root / "field_nan.nii.gz", np.full((*SHAPE, 3), np.nan, np.float32))
    _save(root / "sv.nii.gz", np.ones((12, 10, 8, 16), np.uint8), np.diag([4.0, 4.0, 4.0, 1.0]))
    (root / "notnifti.nii.gz").write_text("this is not a NIfTI file\n")
    data = (root / "ct.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    _corrupt_header(root / "huge_header.nii", (4000, 4000, 4000), source=root / "ct.nii.gz", compress=False)
    _corrupt_header(root / "huge_header.nii.gz", (4000, 4000, 4000), source=root / "ct.nii.gz", compress=True)
    _corrupt_header(root / "long_header.nii.gz", (24, 20, 17), source=root / "ct.nii.gz", compress=True)
    (root / "matrix_text.txt").write_text("one two three\n")
    (root / "matrix_short.txt").write_text("1 0 0 0\n0 1 0 0\n")
    (root / "disp.dat").write_bytes(np.zeros(7, np.float32).tobytes())
    (root / "a_file").write_text("a regular file, not a folder\n")
    (root / "out_dir").mkdir()
    (root / "link_to_ct.nii.gz").symlink_to(root / "ct.nii.gz")
    (root / "pipe_bad_type.toml").write_text(
        f'[pipeline]\nwork_dir = "{root / "work"}"\n[stages.example]\ntype = "fetch-example"\n'
        '[stages.cohort]\ninputs = { source = "example" }\nn_train = "twenty"\n')
    (root / "pipe_unknown.toml").write_text(
        f'[pipeline]\nwork_dir = "{root / "work"}"\n[stages.example]\ntype = "fetch-example"\nsdistt = "x"\n')
    (root / "train_bad.toml").write_text('[data]\ndataset = "x"\n[nonsense]\na = 1\n')
    # bundles with a damaged model card (the weights stay the shipped ones)
    for name, edit in {
        "bundle_files_list": lambda c: c.update(files=["model.pt"]),
        "bundle_template_str": lambda c: c.update(template="the template"),
        "bundle_sha_number": lambda c: c["template"].update(supervoxels_sha256=12),
        "bundle_format": lambda c: c.update(format="something-else/3"),
    }.items():
        target = root / name
        target.mkdir()
        for f in BUNDLE.iterdir():
            if f.name != "SHA256SUMS":
                (target / f.name).symlink_to(f)
        card = json.loads((BUNDLE / "model_card.json").read_text())
        edit(card)
        (target / "model_card.json").unlink()
        (target / "model_card.json").write_text(json.dumps(card))
    (root / "empty_bundle").mkdir()
    header = nib.Nifti1Image(ct, AFF).header
    header["srow_z"] = [0, 0, 0, 0]  # a voxel size of 0 along k: no usable geometry
    header.set_qform(None, code=0)
    header["sform_code"] = 1
    nib.save(nib.Nifti1Image(ct, None, header=header), str(root / "degenerate.nii.gz"))
    nib.save(nib.Nifti1Image(_labels().astype(np.int64) * 10**12, AFF, dtype=np.int64), str(root / "huge_ids.nii.gz"))
    (root / "empty.nii.gz").write_bytes(b"")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + str(p.readlink())
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


# (case id, argv with {d} for the folder, pattern the one error line must match: names the file or argument)
CASES = [
    # warp
    ("warp-missing-moving", "warp --moving {d}/nope.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"nope\.nii\.gz: file not found"),
    ("warp-field-is-image", "warp --moving {d}/ct.nii.gz --field {d}/ct.nii.gz --out {d}/w.nii.gz",
     r"ct\.nii\.gz: expected a displacement field"),
    ("warp-out-is-field", "warp --moving {d}/ct.nii.gz --field {d}/field.nii.gz --out {d}/field.nii.gz",
     r"--out .*field\.nii\.gz: is the input --field"),
    ("warp-out-is-moving", "warp --moving {d}/ct.nii.gz --field {d}/field.nii.gz --out {d}/ct.nii.gz",
     r"--out .*ct\.nii\.gz: is the input --moving"),
    ("warp-out-symlink-to-moving", "warp --moving {d}/ct.nii.gz --field {d}/field.nii.gz --out {d}/link_to_ct.nii.gz",
     r"--out .*link_to_ct\.nii\.gz: is the input --moving"),
    ("warp-out-is-folder", "warp --moving {d}/ct.nii.gz --field {d}/field.nii.gz --out {d}/out_dir",
     r"--out .*out_dir: is an existing folder"),
    ("warp-out-under-file", "warp --moving {d}/ct.nii.gz --field {d}/field.nii.gz --out {d}/a_file/w.nii.gz",
     r"--out .*a_file/w\.nii\.gz: cannot write there, .*a_file is a file"),
    ("warp-device-cuda", "warp --moving {d}/ct.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz --device cuda",
     r"--device: 'cuda' asked for"),
    ("warp-device-invalid", "warp --moving {d}/ct.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz --device gpu0",
     r"--device: expected cpu, cuda or cuda:N, got 'gpu0'"),
    ("warp-not-nifti", "warp --moving {d}/notnifti.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"notnifti\.nii\.gz: not a readable NIfTI"),
    ("warp-truncated", "warp --moving {d}/truncated.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"truncated\.nii\.gz: .*(truncated|corrupt|not a readable)"),
    ("warp-huge-header", "warp --moving {d}/huge_header.nii --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"huge_header\.nii: the header declares 4000 x 4000 x 4000 voxels"),
    ("warp-huge-header-gz", "warp --moving {d}/huge_header.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"huge_header\.nii\.gz: the header declares 4000 x 4000 x 4000 voxels"),
    ("warp-long-header-gz", "warp --moving {d}/long_header.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"long_header\.nii\.gz: the header declares 24 x 20 x 17 voxels .* holds only"),
    ("warp-nan", "warp --moving {d}/nan.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"nan\.nii\.gz: \d+ voxels are NaN or Inf"),
    ("warp-2d-image", "warp --moving {d}/flat2d.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"flat2d\.nii\.gz: expected a 3-D"),
    ("warp-4d-image", "warp --moving {d}/image4d.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"image4d\.nii\.gz: expected a 3-D"),
    ("warp-labels-not-integer", "warp --moving {d}/labels_float.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz "
     "--labels", r"labels_float\.nii\.gz: expected an integer label map"),
    ("warp-field-nan", "warp --moving {d}/ct.nii.gz --field {d}/field_nan.nii.gz --out {d}/w.nii.gz",
     r"field_nan\.nii\.gz: displacement field contains NaN"),
    ("warp-missing-argument", "warp --moving {d}/ct.nii.gz --out {d}/w.nii.gz",
     r"the following arguments are required: --field"),
    # evaluate
    ("evaluate-image-as-labels", "evaluate --fixed-labels {d}/labels_negative.nii.gz --moving-labels {d}/labels.nii.gz",
     r"labels_negative\.nii\.gz: label ids must be >= 0"),
    ("evaluate-field-wrong-grid", "evaluate --fixed-labels {d}/labels.nii.gz --moving-labels {d}/labels.nii.gz "
     "--field {d}/field_small.nii.gz", r"field_small\.nii\.gz: field grid"),
    ("evaluate-json-is-input", "evaluate --fixed-labels {d}/labels.nii.gz --moving-labels {d}/labels.nii.gz "
     "--json {d}/labels.nii.gz", r"--json .*labels\.nii\.gz: is the input --fixed-labels"),
    ("evaluate-bad-label-list", "evaluate --fixed-labels {d}/labels.nii.gz --moving-labels {d}/labels.nii.gz "
     "--labels 3..1", r"argument --labels: expected label ids"),
    ("evaluate-mask-without-gt", "evaluate --fixed-labels {d}/labels.nii.gz --moving-labels {d}/labels.nii.gz "
     "--mask {d}/labels.nii.gz", r"--mask .*needs --gt-field"),
    # align
    ("align-out-is-fixed", "align --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/ct.nii.gz",
     r"--out-field .*ct\.nii\.gz: is the input --fixed"),
    ("align-warped-is-moving", "align --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/u.nii.gz "
     "--out-warped {d}/ct2.nii.gz", r"--out-warped .*ct2\.nii\.gz: is the input --moving"),
    ("align-two-outputs-same", "align --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/u.nii.gz "
     "--out-warped {d}/u.nii.gz", r"u\.nii\.gz: the same file as --out-field"),
    ("align-labels-without-output", "align --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/u.nii.gz "
     "--moving-labels {d}/labels.nii.gz", r"--moving-labels and --out-warped-labels go together"),
    ("align-voxel-size", "align --fixed {d}/ct.nii.gz --moving {d}/ct_3mm.nii.gz --out-field {d}/u.nii.gz",
     r"ct_3mm\.nii\.gz: voxel size"),
    ("align-device-cuda", "align --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/u.nii.gz "
     "--device cuda", r"--device: 'cuda' asked for"),
    ("align-init-field-wrong-grid", "align --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/u.nii.gz "
     "--init-field {d}/field_small.nii.gz", r"field_small\.nii\.gz: field grid"),
    # predict
    ("predict-not-a-bundle", "predict --weights {d}/empty_bundle --image {d}/ct.nii.gz --out {d}/sv_out.nii.gz",
     r"empty_bundle: incomplete weights bundle"),
    ("predict-card-files-list", "predict --weights {d}/bundle_files_list --image {d}/ct.nii.gz "
     "--out {d}/sv_out.nii.gz", r"bundle_files_list/model_card\.json: entry 'files' must be an object"),
    ("predict-card-template-str", "predict --weights {d}/bundle_template_str --image {d}/ct.nii.gz "
     "--out {d}/sv_out.nii.gz", r"bundle_template_str/model_card\.json: entry 'template' must be an object"),
    ("predict-card-sha-number", "predict --weights {d}/bundle_sha_number --image {d}/ct.nii.gz "
     "--out {d}/sv_out.nii.gz", r"model_card\.json: entry template\.supervoxels_sha256 must be a string"),
    ("predict-card-format", "predict --weights {d}/bundle_format --image {d}/ct.nii.gz --out {d}/sv_out.nii.gz",
     r"model_card\.json: format 'something-else/3'"),
    ("predict-out-is-folder", f"predict --weights {BUNDLE} --image {{d}}/ct.nii.gz --out {{d}}/out_dir",
     r"--out .*out_dir: is an existing folder"),
    ("predict-device-cuda", f"predict --weights {BUNDLE} --image {{d}}/ct.nii.gz --out {{d}}/p.nii.gz --device cuda",
     r"--device: 'cuda' asked for"),
    # supervoxels
    ("supervoxels-out-is-image", "supervoxels --image {d}/ct.nii.gz --body-mask --out {d}/ct.nii.gz",
     r"--out .*ct\.nii\.gz: is the input --image"),
    ("supervoxels-out-suffix", "supervoxels --image {d}/ct.nii.gz --body-mask --out {d}/sv.txt",
     r"--out .*sv\.txt: expected a NIfTI name"),
    ("supervoxels-labels-float", "supervoxels --image {d}/ct.nii.gz --labels {d}/labels_float.nii.gz "
     "--out {d}/sv_new.nii.gz", r"labels_float\.nii\.gz: expected an integer label map"),
    # transfer
    ("transfer-field-wrong-grid", "transfer --supervoxels {d}/sv.nii.gz --field {d}/field_small.nii.gz "
     "--fixed {d}/ct.nii.gz --out {d}/t.nii.gz", r"field_small\.nii\.gz: field grid"),
    ("transfer-out-is-supervoxels", "transfer --supervoxels {d}/sv.nii.gz --field {d}/field.nii.gz "
     "--fixed {d}/ct.nii.gz --out {d}/sv.nii.gz", r"--out .*sv\.nii\.gz: is the input --supervoxels"),
    # deeds
    ("deeds-import-missing-dat", "deeds-import --dat {d}/nope.dat --fixed {d}/ct.nii.gz --out {d}/u.nii.gz",
     r"nope\.dat"),
    ("deeds-import-wrong-size-dat", "deeds-import --dat {d}/disp.dat --fixed {d}/ct.nii.gz --out {d}/u.nii.gz",
     r"disp\.dat"),
    ("deeds-import-matrix-text", "deeds-import --dat {d}/disp.dat --matrix {d}/matrix_text.txt "
     "--fixed {d}/ct.nii.gz --out {d}/u.nii.gz", r"(matrix_text\.txt|disp\.dat)"),
    ("deeds-import-out-is-fixed", "deeds-import --dat {d}/disp.dat --fixed {d}/ct.nii.gz --out {d}/ct.nii.gz",
     r"--out .*ct\.nii\.gz: is the input --fixed"),
    ("deeds-export-not-a-field", "deeds-export --field {d}/ct.nii.gz --out {d}/stem",
     r"ct\.nii\.gz: expected a displacement field"),
    ("deeds-export-stem-under-file", "deeds-export --field {d}/field.nii.gz --out {d}/a_file/stem",
     r"--out .*a_file/stem_displacements\.dat: cannot write there"),
    # register
    ("register-missing-bundle", "register --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/u.nii.gz "
     "--weights {d}/nope_bundle", r"nope_bundle"),
    ("register-out-is-moving", "register --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/ct2.nii.gz",
     r"--out-field .*ct2\.nii\.gz: is the input --moving"),
    ("register-device-cuda", "register --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/u.nii.gz "
     "--device cuda", r"--device: 'cuda' asked for"),
    # preprocess, cohort, train, run
    ("preprocess-2d", "preprocess --image {d}/flat2d.nii.gz --out {d}/prep", r"flat2d\.nii\.gz"),
    ("preprocess-out-is-file", "preprocess --image {d}/ct.nii.gz --out {d}/a_file",
     r"--out .*a_file: is an existing file, expected a folder"),
    ("cohort-out-is-file", "cohort --out {d}/a_file", r"--out .*a_file: is an existing file, expected a folder"),
    ("train-missing-config", "train --config {d}/nope.toml", r"nope\.toml"),
    ("train-unknown-section", "train --config {d}/train_bad.toml", r"train_bad\.toml"),
    ("run-missing-pipeline", "run {d}/nope.toml", r"nope\.toml: pipeline file not found"),
    ("run-parameter-type", "run {d}/pipe_bad_type.toml",
     r"pipe_bad_type\.toml: \[stages\.cohort\]: n_train = 'twenty': expected an integer, got str"),
    ("run-unknown-parameter", "run {d}/pipe_unknown.toml", r"pipe_unknown\.toml: .*unknown parameter"),
    ("unknown-command", "warpp --moving x", r"invalid choice: 'warpp'"),
    # found by a wider sweep: degenerate geometry, 64-bit ids, counts, binary configs, absent labels
    ("warp-degenerate-affine", "warp --moving {d}/degenerate.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"degenerate\.nii\.gz: the voxel-to-world matrix is degenerate"),
    ("evaluate-degenerate-affine", "evaluate --fixed-labels {d}/labels.nii.gz --moving-labels {d}/degenerate.nii.gz",
     r"degenerate\.nii\.gz: the voxel-to-world matrix is degenerate"),
    ("warp-empty-file", "warp --moving {d}/empty.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"empty\.nii\.gz: not a readable NIfTI"),
    ("warp-huge-label-ids", "warp --moving {d}/huge_ids.nii.gz --labels --field {d}/field.nii.gz --out {d}/w.nii.gz",
     r"huge_ids\.nii\.gz: label values .* outside the int32 range"),
    ("align-threads-zero", "align --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/u.nii.gz --threads 0",
     r"--threads: expected an integer >= 1, got 0"),
    ("align-negative-seed", "align --fixed {d}/ct.nii.gz --moving {d}/ct2.nii.gz --out-field {d}/u.nii.gz --seed -1",
     r"--seed: expected an integer >= 0, got -1"),
    ("supervoxels-negative-seed", "supervoxels --image {d}/ct.nii.gz --body-mask --out {d}/s.nii.gz --seed -3",
     r"--seed: expected an integer >= 0, got -3"),
    ("train-binary-config", "train --config {d}/ct.nii.gz", r"ct\.nii\.gz: not a text file"),
    ("run-binary-pipeline", "run {d}/ct.nii.gz", r"ct\.nii\.gz: not a text file"),
    ("evaluate-labels-absent", "evaluate --fixed-labels {d}/labels.nii.gz --moving-labels {d}/labels.nii.gz "
     "--labels 99", r"--labels: none of the ids \[99\] occurs in"),
]


@pytest.mark.parametrize("argv, pattern", [pytest.param(a, p, id=i) for i, a, p in CASES if p is not None])
def test_bad_input_gives_one_line(d, capsys, argv, pattern):
    before = _snapshot(d)
    args = argv.format(d=d).split()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if re.match(r"^slicreg( [\w-]+)?: (error|internal error)", line)]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert _snapshot(d) == before, "inputs changed or files were left behind"


def test_the_table_is_large_enough():
    commands = {a.split()[0] for _, a, p in CASES if p is not None}
    assert len([c for c in CASES if c[2] is not None]) >= 40
    assert len(commands) >= 12, commands


def test_unwritable_output_is_one_line(d, capsys, monkeypatch):
    """A folder that refuses the write (read-only mount, permissions the pre-check cannot see as root)."""
    import os as os_module

    before = _snapshot(d)

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os_module, "replace", refuse)
    rc = main(f"warp --moving {d}/ct.nii.gz --field {d}/field.nii.gz --out {d}/w.nii.gz".split())
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("slicreg warp: error:")]
    assert len(lines) == 1 and "w.nii.gz: Permission denied" in lines[0], err
    monkeypatch.undo()
    assert _snapshot(d) == before


def test_read_only_folder_is_refused_before_work(tmp_path, capsys):
    import os as os_module

    if os_module.geteuid() == 0:
        pytest.skip("root writes into read-only folders; covered by test_unwritable_output_is_one_line")
    src = tmp_path / "in"
    src.mkdir()
    _save(src / "ct.nii.gz", _ct())
    _save(src / "field.nii.gz", np.zeros((*SHAPE, 3), np.float32))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(f"warp --moving {src}/ct.nii.gz --field {src}/field.nii.gz --out {ro}/w.nii.gz".split())
    finally:
        ro.chmod(0o755)
    assert rc == 2 and "is not writable" in capsys.readouterr().err
