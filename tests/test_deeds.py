"""deeds interoperability: file layout, upsampling rule, warping, round trip, errors.

The reference below is a deliberately naive per-voxel implementation of deeds' documented rules
(docs/deeds.md; docs/method.md, section 2), written from the description and reading the raw file layout itself: it
shares no code with slicreg.deeds, so agreement checks the layout, the block order, the matrix transposition, the
control-node placement and the warping rules at once.
"""

import math
import struct

import numpy as np
import pytest

from pipelines.cli import main
from slicreg import deeds
from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.fields import sample, warp_image, warp_labels
from slicreg.io import load_field, save_field, save_volume


# ------------------------------------------------------------------------------------ naive reference
def naive_deeds(dat_bytes, matrix_text, shape, g, image, seg):
    """deeds' warp of ``image`` (trilinear) and ``seg`` (nearest) for a fixed grid of ``shape``, voxel by voxel."""
    m, n, o = shape
    m1, n1, o1 = m // g, n // g, o // g
    count = len(dat_bytes) // 4
    flat = struct.unpack(f"<{count}f", dat_bytes)
    size = m1 * n1 * o1
    assert count == 3 * size
    blocks = [flat[:size], flat[size:2 * size], flat[2 * size:]]  # u (axis 1), v (axis 0), w (axis 2)
    rows = [[float(t) for t in line.split()] for line in matrix_text.strip().splitlines()]
    # row-vector convention [y, 1] = [x, 1] F  ->  y_a = sum_b x_b F[b][a] + F[3][a]

    def ctrl(block, a, b, c):
        a = min(max(a, 0), m1 - 1)
        b = min(max(b, 0), n1 - 1)
        c = min(max(c, 0), o1 - 1)
        return block[a + b * m1 + c * m1 * n1]

    def tri(block, x, y, z):
        i0, j0, k0 = math.floor(x), math.floor(y), math.floor(z)
        fx, fy, fz = x - i0, y - j0, z - k0
        total = 0.0
        for di in (0, 1):
            for dj in (0, 1):
                for dk in (0, 1):
                    w = (fx if di else 1 - fx) * (fy if dj else 1 - fy) * (fz if dk else 1 - fz)
                    total += w * ctrl(block, i0 + di, j0 + dj, k0 + dk)
        return total

    def img_at(p):
        i0, j0, k0 = (math.floor(c) for c in p)
        fx, fy, fz = p[0] - i0, p[1] - j0, p[2] - k0
        total = 0.0
        for di in (0, 1):
            for dj in (0, 1):
                for dk in (0, 1):
                    w = (fx if di else 1 - fx) * (fy if dj else 1 - fy) * (fz if dk else 1 - fz)
                    a = min(max(i0 + di, 0), m - 1)
                    b = min(max(j0 + dj, 0), n - 1)
                    c = min(max(k0 + dk, 0), o - 1)
                    total += w * float(image[a, b, c])
        return total

    def c_round(v):
        return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)

    out_img = np.zeros(shape, np.float64)
    out_seg = np.zeros(shape, seg.dtype)
    for i in range(m):
        for j in range(n):
            for k in range(o):
                x, y, z = i * m1 / m, j * n1 / n, k * o1 / o  # control-grid coordinates of voxel (i, j, k)
                d = (tri(blocks[1], x, y, z), tri(blocks[0], x, y, z), tri(blocks[2], x, y, z))
                p = [i * rows[0][a] + j * rows[1][a] + k * rows[2][a] + rows[3][a] + d[a] for a in range(3)]
                out_img[i, j, k] = img_at(p)
                q = [min(max(c_round(p[a]), 0), shape[a] - 1) for a in range(3)]
                out_seg[i, j, k] = seg[q[0], q[1], q[2]]
    return out_img, out_seg


def _case(shape, g, seed, with_matrix=True):
    rng = np.random.default_rng(seed)
    m1, n1, o1 = (s // g for s in shape)
    dat = rng.normal(scale=1.5, size=3 * m1 * n1 * o1).astype("<f4").tobytes()
    if with_matrix:
        lin = np.eye(3) + rng.normal(scale=0.04, size=(3, 3))
        trans = rng.normal(scale=1.0, size=3)
        f = np.zeros((4, 4))
        f[:3, :3] = lin.T
        f[3, :3] = trans
        f[3, 3] = 1
        text = "".join("  ".join(f"{v:.6f}" for v in row) + "\n" for row in f)
    else:
        text = "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n"
    image = rng.uniform(-1000, 1000, size=shape).astype(np.float32)
    seg = rng.integers(0, 6, size=shape).astype(np.uint8)  # random per voxel: any position error flips a label
    return dat, text, image, seg


CASES = [((12, 8, 16), 4, 0), ((13, 9, 11), 4, 1), ((10, 14, 7), 3, 2), ((9, 6, 10), 2, 3)]


@pytest.mark.parametrize("shape,g,seed", CASES)
def test_agrees_with_naive_deeds_reference(shape, g, seed):
    dat, text, image, seg = _case(shape, g, seed)
    ref_img, ref_seg = naive_deeds(dat, text, shape, g, image, seg)
    ctrl, g_used, inferred = deeds.decode_displacements(dat, shape, grid_spacing=g)
    assert (g_used, inferred) == (g, False)
    matrix = deeds.parse_matrix(text)
    # deeds-native warping helpers
    np.testing.assert_array_equal(deeds.warp_labels_deeds(seg, ctrl, matrix=matrix), ref_seg)
    np.testing.assert_allclose(deeds.warp_image_deeds(image, ctrl, matrix=matrix), ref_img, atol=0.05, rtol=0)
    # the project path: dense field, then the generic warps with border padding (deeds clamps)
    field = deeds.field_from_deeds(ctrl, shape, matrix=matrix)
    np.testing.assert_array_equal(warp_labels(seg, field, padding="border"), ref_seg)
    np.testing.assert_allclose(warp_image(image, field, padding="border"), ref_img, atol=0.05, rtol=0)


def test_agrees_without_matrix():
    shape, g = (11, 10, 9), 4
    dat, text, image, seg = _case(shape, g, 7, with_matrix=False)
    ref_img, ref_seg = naive_deeds(dat, text, shape, g, image, seg)
    ctrl, _, _ = deeds.decode_displacements(dat, shape)
    np.testing.assert_array_equal(deeds.warp_labels_deeds(seg, ctrl), ref_seg)
    np.testing.assert_allclose(deeds.warp_image_deeds(image, ctrl), ref_img, atol=0.05, rtol=0)


def test_cell_centre_upsampling_would_be_caught():
    """The comparison is sharp: the common align_corners=False reading of the control grid disagrees."""
    shape, g = (12, 8, 16), 4
    dat, text, image, seg = _case(shape, g, 0)
    ref_img, _ = naive_deeds(dat, text, shape, g, image, seg)
    ctrl, _, _ = deeds.decode_displacements(dat, shape)
    import torch

    axes = [torch.arange(s, dtype=torch.float32) / g - 0.375 for s in shape]  # cell-centre node placement
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    wrong = sample(torch.from_numpy(ctrl), grid, interpolation="linear", padding="border").numpy()
    field = wrong + deeds.field_from_deeds(np.zeros_like(ctrl), shape, matrix=deeds.parse_matrix(text))
    assert np.abs(warp_image(image, field, padding="border") - ref_img).max() > 1.0


# -------------------------------------------------------------------------------------- the file layout
def test_block_order_axis1_first():
    shape = (8, 12, 16)
    m1, n1, o1 = 2, 3, 4
    size = m1 * n1 * o1
    for block, axis, value in ((0, 1, 3.0), (1, 0, 2.0), (2, 2, -4.0)):
        values = np.zeros(3 * size, np.float32)
        values[block * size:(block + 1) * size] = value
        ctrl, _, _ = deeds.decode_displacements(values.astype("<f4").tobytes(), shape)
        u = deeds.field_from_deeds(ctrl, shape)
        np.testing.assert_array_equal(u[axis], value)
        others = [a for a in range(3) if a != axis]
        assert not np.any(u[others])


def test_fortran_order_inside_blocks():
    shape = (12, 8, 10)
    m1, n1, o1 = 3, 2, 2
    raw = bytearray()
    for block in range(3):
        for k in range(o1):
            for j in range(n1):
                for i in range(m1):  # axis 0 fastest
                    raw += struct.pack("<f", 100 * block + i + 10 * j + 1000 * k)
    ctrl, _, _ = deeds.decode_displacements(bytes(raw), shape)
    i, j, k = np.meshgrid(np.arange(m1), np.arange(n1), np.arange(o1), indexing="ij")
    np.testing.assert_array_equal(ctrl[1], 0 + i + 10 * j + 1000 * k)  # block 0 = axis 1
    np.testing.assert_array_equal(ctrl[0], 100 + i + 10 * j + 1000 * k)  # block 1 = axis 0
    np.testing.assert_array_equal(ctrl[2], 200 + i + 10 * j + 1000 * k)
    assert deeds.encode_displacements(ctrl) == bytes(raw)


def test_control_nodes_sit_at_q_times_m_over_m1():
    shape = (16, 13, 8)
    ctrl = np.zeros((3, 4, 3, 2), np.float32)
    ctrl[0] = np.arange(4, dtype=np.float32)[:, None, None]  # d0 at node q = q
    ctrl[1] = np.arange(3, dtype=np.float32)[None, :, None]
    d = deeds.upsample_control(ctrl, shape)
    np.testing.assert_allclose(d[0, :, 0, 0], np.minimum(np.arange(16) / 4, 3), atol=1e-6)  # node q at voxel 4q
    np.testing.assert_allclose(d[1, 0, :, 0], np.minimum(np.arange(13) * 3 / 13, 2), atol=1e-6)  # at q*13/3
    nodes = deeds.control_node_positions(shape, (4, 3, 2))
    np.testing.assert_allclose(nodes[1], [0, 13 / 3, 26 / 3])


def test_matrix_is_transposed_translation_in_last_row():
    shape = (8, 8, 8)
    text = "1 0 0 0\n0.1 1 0 0\n0 0 1 0\n2 3 -4 1\n"  # y0 = i + 0.1 j + 2, y1 = j + 3, y2 = k - 4
    a = deeds.parse_matrix(text)
    np.testing.assert_allclose(a[:3, 3], [2, 3, -4])
    assert a[0, 1] == pytest.approx(0.1) and a[1, 0] == 0
    u = deeds.field_from_deeds(np.zeros((3, 2, 2, 2), np.float32), shape, matrix=a)
    j = np.arange(8)[None, :, None]
    np.testing.assert_allclose(u[0], np.broadcast_to(0.1 * j + 2, shape), atol=1e-5)
    np.testing.assert_allclose(u[1], 3, atol=1e-6)
    np.testing.assert_allclose(u[2], -4, atol=1e-6)
    np.testing.assert_allclose(deeds.parse_matrix(deeds.format_matrix(a)), a, atol=1e-7)


def test_composition_is_additive():
    """d is added after the affine, not passed through it: A x + d(x)."""
    shape = (8, 8, 8)
    a = np.diag([2.0, 1.0, 1.0, 1.0])
    ctrl = np.zeros((3, 2, 2, 2), np.float32)
    ctrl[0] = 1.0
    pos = deeds.deeds_positions(ctrl, shape, matrix=a)
    np.testing.assert_allclose(pos[0], 2 * np.arange(8)[:, None, None] + 1.0 + np.zeros(shape))


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("shape,g", [((16, 12, 20), 4), ((13, 9, 11), 4), ((10, 14, 7), 3)])
def test_write_read_reproduces_field_on_control_grid(tmp_path, shape, g):
    rng = np.random.default_rng(5)
    import scipy.ndimage as ndi

    field = np.stack([ndi.gaussian_filter(rng.normal(size=shape), 2) * 20 for _ in range(3)]).astype(np.float32)
    ctrl, matrix = deeds.deeds_from_field(field, grid_spacing=g)
    dat, mat = deeds.write_deeds(tmp_path / "F", ctrl, matrix)
    assert dat.name == "F_displacements.dat" and mat.name == "F_matrix.txt"
    back = deeds.read_deeds(dat, shape, matrix_path=mat, grid_spacing=g)
    np.testing.assert_array_equal(back.ctrl_vox, ctrl)
    np.testing.assert_array_equal(back.matrix, np.eye(4))
    # the control values are the field at the nodes q*m/m1 (independent trilinear sampling)
    import torch

    nodes = deeds.control_node_positions(shape, ctrl.shape[1:])
    grid = torch.stack(torch.meshgrid(*[torch.tensor(n, dtype=torch.float64) for n in nodes], indexing="ij"))
    expected = sample(torch.from_numpy(field.astype(np.float64)), grid, interpolation="linear",
                      padding="border").numpy()
    np.testing.assert_allclose(back.ctrl_vox, expected, atol=1e-5)
    if all(s % g == 0 for s in shape):  # nodes are voxels 0, g, 2g...: the dense field agrees there
        dense = back.to_field()
        np.testing.assert_allclose(dense[:, ::g, ::g, ::g], field[:, ::g, ::g, ::g], atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 12, 20), (13, 9, 11)])
def test_deeds_field_round_trips_losslessly(shape):
    rng = np.random.default_rng(6)
    ctrl = rng.normal(size=(3, *deeds.control_shape(shape, 4))).astype(np.float32)
    a = np.eye(4)
    a[:3, :3] += rng.normal(scale=0.03, size=(3, 3))
    a[:3, 3] = [1.5, -2.0, 0.5]
    field = deeds.field_from_deeds(ctrl, shape, matrix=a)
    method = "sample" if all(s % 4 == 0 for s in shape) else "lstsq"
    ctrl2, a2 = deeds.deeds_from_field(field, grid_spacing=4, affine=a, method=method)
    np.testing.assert_allclose(ctrl2, ctrl, atol=2e-4)
    np.testing.assert_allclose(deeds.field_from_deeds(ctrl2, shape, matrix=a2), field, atol=2e-4)


def test_affine_fit_recovers_an_affine_field():
    shape = (12, 10, 14)
    a = np.eye(4)
    a[:3, :3] += np.array([[0.05, 0.02, 0], [0, -0.03, 0.01], [0.02, 0, 0.04]])
    a[:3, 3] = [1, -2, 3]
    field = deeds.field_from_deeds(np.zeros((3, 3, 2, 3), np.float32), shape, matrix=a)
    np.testing.assert_allclose(deeds.fit_affine_vox(field), a, atol=1e-5)
    ctrl, a2 = deeds.deeds_from_field(field, affine="fit")
    np.testing.assert_allclose(ctrl, 0, atol=1e-4)


# ---------------------------------------------------------------------------------------- grid spacing
def test_grid_spacing_inference_only_when_unique():
    shape = (16, 12, 20)
    n = 3 * 4 * 3 * 5
    assert deeds.resolve_grid_spacing(n, shape, "auto") == (4, True)
    assert deeds.resolve_grid_spacing(n, shape, 4) == (4, False)
    with pytest.raises(InputError, match="fits grid spacing 4"):
        deeds.resolve_grid_spacing(n, shape, 3)
    # (6, 6, 6): g = 4 and g = 5 both give a 1x1x1 grid
    assert deeds.matching_grid_spacings(3, (6, 6, 6)) == [4, 5, 6]
    with pytest.raises(InputError, match="several grid spacings"):
        deeds.resolve_grid_spacing(3, (6, 6, 6), "auto")
    with pytest.raises(InputError, match="fits no grid spacing"):
        deeds.resolve_grid_spacing(7, shape, "auto")


def test_applybcv_grid_step_guess():
    assert deeds.applybcv_grid_step((192, 160, 256), (48, 40, 64)) == 4
    assert deeds.applybcv_grid_step((13, 9, 11), (3, 2, 2)) == 5  # 1287 / 12 voxels per node: cbrt = 4.75


# ----------------------------------------------------------------------------------------------- errors
def test_wrong_file_size_is_a_clear_error(tmp_path):
    path = tmp_path / "F_displacements.dat"
    path.write_bytes(np.zeros(3 * 4 * 3 * 5, "<f4").tobytes())
    with pytest.raises(InputError) as exc:
        deeds.read_deeds(path, (16, 12, 24))
    msg = str(exc.value)
    assert str(path) in msg and "expected 3 x 4 x 3 x 6" in msg and "got 180 float32 values" in msg
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="not a whole number of float32"):
        deeds.read_deeds(path, (16, 12, 24))
    with pytest.raises(InputError, match="file not found"):
        deeds.read_deeds(tmp_path / "nope.dat", (16, 12, 24))


def test_nan_entries_are_a_clear_error():
    values = np.zeros(3 * 2 * 2 * 2, np.float32)
    values[5] = np.nan
    with pytest.raises(InputError, match="1 of 24 values are NaN or Inf"):
        deeds.decode_displacements(values.tobytes(), (8, 8, 8))


@pytest.mark.parametrize("text,match", [
    ("1 0 0 0\n0 1 0 0\n0 0 1 0\n", "4 lines of 4 numbers"),
    ("1 0 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "4 lines of 4 numbers"),
    ("1 0 0 0\n0 1 0 0\n0 0 one 0\n0 0 0 1\n", "expected numbers"),
    ("1 0 0 0\n0 1 0 nan\n0 0 1 0\n0 0 0 1\n", "NaN or Inf"),
    ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 -nan\n", "NaN or Inf"),  # C++ streams write NaN as -nan
    ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 inf\n", "NaN or Inf"),  # even in the ignored last column
    ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n0 0 0 1\n", "4 lines of 4 numbers"),
    ("1, 0, 0, 0\n0, 1, 0, 0\n0, 0, 1, 0\n0, 0, 0, 1\n", "expected numbers, got '1,'"),
    ("0 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "singular"),
])
def test_bad_matrix_is_a_clear_error(tmp_path, text, match):
    (tmp_path / "F_matrix.txt").write_text(text)
    (tmp_path / "F_displacements.dat").write_bytes(np.zeros(24, "<f4").tobytes())
    with pytest.raises(InputError, match=match) as exc:
        deeds.read_deeds(tmp_path / "F_displacements.dat", (8, 8, 8), matrix_path=tmp_path / "F_matrix.txt")
    assert str(tmp_path / "F_matrix.txt") in str(exc.value)


# ---------------------------------------------------------------------------------------------- commands
def test_import_and_export_commands(tmp_path, capsys):
    shape, g = (13, 9, 11), 4
    dat, text, image, seg = _case(shape, g, 4)
    (tmp_path / "F_displacements.dat").write_bytes(dat)
    (tmp_path / "F_matrix.txt").write_text(text)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(Volume(image, aff), tmp_path / "fixed.nii.gz")
    out = tmp_path / "u.nii.gz"
    assert main(["deeds-import", "--dat", str(tmp_path / "F_displacements.dat"), "--matrix",
                 str(tmp_path / "F_matrix.txt"), "--fixed", str(tmp_path / "fixed.nii.gz"),
                 "--grid-spacing", "auto", "--out", str(out)]) == 0
    assert "inferred from the file size" in capsys.readouterr().out
    field = load_field(out)
    np.testing.assert_allclose(field.affine, aff)
    _, ref_seg = naive_deeds(dat, text, shape, g, image, seg)
    np.testing.assert_array_equal(warp_labels(seg, field.array, padding="border"), ref_seg)

    # export with the same matrix and the least-squares control values: lossless although 13, 9, 11 are not
    # multiples of 4
    assert main(["deeds-export", "--field", str(out), "--out", str(tmp_path / "E"), "--method", "lstsq",
                 "--matrix", str(tmp_path / "F_matrix.txt")]) == 0
    assert "applyBCV infers the grid step" in capsys.readouterr().out  # 13 x 9 x 11 fools applyBCV's guess
    back = deeds.read_deeds(tmp_path / "E_displacements.dat", shape, matrix_path=tmp_path / "E_matrix.txt")
    np.testing.assert_allclose(back.to_field(), field.array, atol=1e-3)
    np.testing.assert_array_equal(deeds.warp_labels_deeds(seg, back.ctrl_vox, matrix=back.matrix), ref_seg)

    assert main(["deeds-import", "--dat", str(tmp_path / "F_displacements.dat"), "--fixed",
                 str(tmp_path / "fixed.nii.gz"), "--grid-spacing", "3", "--out", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "grid spacing 4" in err


# ------------------------------------------------------------------------- real deeds output, odd grid sizes
# A *_matrix.txt exactly as linearBCV writes it: each line "X[i]  X[i+4]  X[i+8]  X[i+12]" through a C++ stream
# (default notation: 6 significant digits, two spaces between numbers). linearBCV fits all 16 numbers by least
# squares, so the last column is only approximately 0 0 0 1 (these are the values of the report in issue 16).
LINEARBCV_MATRIX = (
    "1.01242  0.0187061  -0.00451267  -7.53e-07\n"
    "-0.0228131  0.985093  0.0112903  -2.50401e-06\n"
    "0.00714436  -0.0165934  1.02611  -1.33e-06\n"
    "1.41283  -2.17519  0.84066  1.00037\n"
)
ODD_SHAPE = (37, 29, 23)  # no side is a multiple of 4 or 5


def _stream_text(f):
    """A row-vector matrix ``f`` formatted as linearBCV's ``ofstream << float`` does (C ``%g``, two spaces)."""
    return "".join("  ".join(f"{float(np.float32(v)):g}" for v in row) + "\n" for row in f)


def _odd_case(g, seed):
    rng = np.random.default_rng(seed)
    ctrl_shape = deeds.control_shape(ODD_SHAPE, g)
    dat = rng.normal(scale=1.5, size=3 * int(np.prod(ctrl_shape))).astype("<f4").tobytes()
    image = rng.uniform(-1000, 1000, size=ODD_SHAPE).astype(np.float32)
    seg = rng.integers(0, 6, size=ODD_SHAPE).astype(np.uint8)
    return dat, image, seg


def test_fixture_has_linearbcv_layout():
    """The fixture is what linearBCV's stream writes for its numbers, and the writer uses the same layout."""
    f = np.array([[float(t) for t in line.split("  ")] for line in LINEARBCV_MATRIX.splitlines()])
    assert _stream_text(f) == LINEARBCV_MATRIX
    assert not np.allclose(f[:, 3], [0, 0, 0, 1], atol=1e-4)  # the case that used to be refused
    written = deeds.format_matrix(deeds.parse_matrix(LINEARBCV_MATRIX))
    lines = written.splitlines()
    assert written.endswith("\n") and len(lines) == 4
    assert all(len(line.split("  ")) == 4 and " " not in line.replace("  ", "") for line in lines)
    assert [line.split("  ")[3] for line in lines] == ["0", "0", "0", "1"]


def test_linearbcv_matrix_last_column_is_ignored_as_deeds_does(caplog):
    with caplog.at_level("INFO", logger="slicreg.deeds"):
        a = deeds.parse_matrix(LINEARBCV_MATRIX, name="F_matrix.txt")
    assert not caplog.records  # within 1e-3 of 0 0 0 1: nothing to note
    f = np.array([[float(t) for t in line.split()] for line in LINEARBCV_MATRIX.splitlines()])
    np.testing.assert_array_equal(a[:3], f.T[:3])  # the 12 numbers deeds reads, unchanged
    np.testing.assert_array_equal(a[3], [0, 0, 0, 1])
    np.testing.assert_array_equal(a[:3, 3], [1.41283, -2.17519, 0.84066])
    # the last column has no influence at all, however far off
    g = f.copy()
    g[:, 3] = [0.3, -0.2, 5.0, 7.0]
    np.testing.assert_array_equal(deeds.parse_matrix(_stream_text(g)), deeds.parse_matrix(_stream_text(f)))


def test_far_last_column_is_a_note_not_an_error(caplog):
    """A column-vector matrix (translation in the last column) is read as deeds would read it (translation 0),
    with a note that names the file and suggests transposing."""
    text = "1 0 0 2\n0 1 0 3\n0 0 1 -4\n0 0 0 1\n"
    with caplog.at_level("WARNING", logger="slicreg.deeds"):
        a = deeds.parse_matrix(text, name="cv_matrix.txt")
    np.testing.assert_array_equal(a, np.eye(4))
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert msg.startswith("cv_matrix.txt: note:") and "2 3 -4 1" in msg and "transpose" in msg


@pytest.mark.parametrize("g", [4, 5])
def test_control_grid_of_odd_sizes_is_floor_divided(g):
    m1, n1, o1 = deeds.control_shape(ODD_SHAPE, g)
    assert (m1, n1, o1) == {4: (9, 7, 5), 5: (7, 5, 4)}[g]
    dat, _, _ = _odd_case(g, 0)
    ctrl, g_used, _ = deeds.decode_displacements(dat, ODD_SHAPE, grid_spacing=g)
    assert ctrl.shape == (3, m1, n1, o1) and g_used == g
    assert deeds.matching_grid_spacings(len(dat) // 4, ODD_SHAPE) == [g]
    assert deeds.encode_displacements(ctrl) == dat
    with pytest.raises(InputError, match="fits grid spacing"):
        deeds.decode_displacements(dat, ODD_SHAPE, grid_spacing=9 - g)


def test_real_matrix_odd_grid_agrees_with_naive_deeds():
    """linearBCV's matrix (least-squares last column) on a 37 x 29 x 23 grid with spacing 5: the import gives
    deeds' own warps (the naive reference reads only the first three columns, as deeds does)."""
    g = 5
    dat, image, seg = _odd_case(g, 11)
    ref_img, ref_seg = naive_deeds(dat, LINEARBCV_MATRIX, ODD_SHAPE, g, image, seg)
    ctrl, _, _ = deeds.decode_displacements(dat, ODD_SHAPE, grid_spacing=g)
    matrix = deeds.parse_matrix(LINEARBCV_MATRIX)
    np.testing.assert_array_equal(deeds.warp_labels_deeds(seg, ctrl, matrix=matrix), ref_seg)
    np.testing.assert_allclose(deeds.warp_image_deeds(image, ctrl, matrix=matrix), ref_img, atol=0.05, rtol=0)
    field = deeds.field_from_deeds(ctrl, ODD_SHAPE, matrix=matrix)
    np.testing.assert_array_equal(deeds.warp_labels_field_deeds(seg, field), ref_seg)
    np.testing.assert_allclose(deeds.warp_image_field_deeds(image, field), ref_img, atol=0.05, rtol=0)
    # the translation moves voxels off the grid: there deeds' clamped label differs from background
    pos = deeds.deeds_positions(ctrl, ODD_SHAPE, matrix=matrix)
    outside = np.zeros(ODD_SHAPE, bool)
    for ax, s in enumerate(ODD_SHAPE):
        outside |= (pos[ax] < -0.5) | (pos[ax] > s - 0.5)
    assert outside.sum() > 100 and np.all(warp_labels(seg, field)[outside] == 0)
    assert np.any(ref_seg[outside] != 0)


@pytest.mark.parametrize("g", [4, 5])
def test_import_export_commands_round_trip_real_matrix_odd_grid(tmp_path, capsys, caplog, g):
    dat, image, seg = _odd_case(g, 20 + g)
    (tmp_path / "F_displacements.dat").write_bytes(dat)
    (tmp_path / "F_matrix.txt").write_text(LINEARBCV_MATRIX)
    save_volume(Volume(image, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "fixed.nii.gz")
    out = tmp_path / "u.nii.gz"
    assert main(["deeds-import", "--dat", str(tmp_path / "F_displacements.dat"), "--matrix",
                 str(tmp_path / "F_matrix.txt"), "--fixed", str(tmp_path / "fixed.nii.gz"),
                 "--grid-spacing", str(g), "--out", str(out)]) == 0  # was refused (exit 2) before issue 16
    assert "note:" not in caplog.text
    ctrl = deeds.decode_displacements(dat, ODD_SHAPE, grid_spacing=g)[0]
    matrix = deeds.parse_matrix(LINEARBCV_MATRIX)
    field = load_field(out).array
    np.testing.assert_array_equal(field, deeds.field_from_deeds(ctrl, ODD_SHAPE, matrix=matrix))
    capsys.readouterr()

    assert main(["deeds-export", "--field", str(out), "--out", str(tmp_path / "E"), "--method", "lstsq",
                 "--matrix", str(tmp_path / "F_matrix.txt"), "--grid-spacing", str(g)]) == 0
    warned = "applyBCV infers the grid step" in capsys.readouterr().out
    assert warned == (g == 5)  # 37*29*23 / (7*5*4) voxels per node: cube root 5.6 -> applyBCV guesses 6
    back = deeds.read_deeds(tmp_path / "E_displacements.dat", ODD_SHAPE, matrix_path=tmp_path / "E_matrix.txt",
                            grid_spacing=g)
    np.testing.assert_allclose(back.ctrl_vox, ctrl, atol=2e-4)
    np.testing.assert_array_equal(back.matrix.astype(np.float32), matrix.astype(np.float32))  # deeds reads float
    assert [line.split()[3] for line in (tmp_path / "E_matrix.txt").read_text().splitlines()] == ["0", "0", "0", "1"]
    np.testing.assert_allclose(back.to_field(), field, atol=1e-3)
    np.testing.assert_array_equal(deeds.warp_labels_deeds(seg, back.ctrl_vox, matrix=back.matrix),
                                  deeds.warp_labels_deeds(seg, ctrl, matrix=matrix))


# ------------------------------------------------------------------------------------------- deeds' rules
def _outside_case():
    shape = (6, 5, 4)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    seg = (1 + i + 10 * j).astype(np.uint8)  # distinct labels along axes 0 and 1, none is background
    field = np.zeros((3, *shape), np.float32)
    field[0, :3] = 10.0  # the first half points beyond the last voxel along axis 0
    field[0, 3:] = -10.0  # the second half before the first one
    field[1] = 0.4
    clamped = np.where(i < 3, seg[-1][None], seg[0][None]).astype(np.uint8)
    return seg, field, clamped


def test_deeds_label_rule_clamps_where_learn2reg_gives_background():
    seg, field, clamped = _outside_case()
    np.testing.assert_array_equal(deeds.warp_labels_field_deeds(seg, field), clamped)
    assert not np.any(warp_labels(seg, field))  # the default (Learn2Reg) rule: background outside
    # C rounding: 2.5 -> 3 (round-half-to-even would give 2); -1.5 -> -2, clamped to 0
    pos = np.zeros((3, 1, 1, 2), np.float32)
    pos[0, 0, 0] = [2.5, -1.5]
    np.testing.assert_array_equal(deeds.sample_labels_deeds(seg, pos)[0, 0], [seg[3, 0, 0], seg[0, 0, 0]])
    with pytest.raises(InputError, match="pos_vox"):
        deeds.sample_labels_deeds(seg, np.zeros((2, 1, 1, 1), np.float32))


def test_warp_command_deeds_rules(tmp_path, capsys):
    seg, field, clamped = _outside_case()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(Volume(seg, aff), tmp_path / "seg.nii.gz")
    save_field(field, aff, tmp_path / "u.nii.gz")
    base = ["warp", "--moving", str(tmp_path / "seg.nii.gz"), "--field", str(tmp_path / "u.nii.gz"), "--labels"]
    assert main([*base, "--out", str(tmp_path / "deeds.nii.gz"), "--deeds-rules"]) == 0
    assert "deeds' rules" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "l2r.nii.gz")]) == 0
    from slicreg.io import load_labels

    np.testing.assert_array_equal(load_labels(tmp_path / "deeds.nii.gz").array, clamped)
    assert not np.any(load_labels(tmp_path / "l2r.nii.gz").array)
    assert main([*base, "--out", str(tmp_path / "x.nii.gz"), "--deeds-rules", "--padding", "zeros"]) == 2
    assert "contradicts --deeds-rules" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()

    # images: deeds' trilinear sampler with clamped indices
    rng = np.random.default_rng(3)
    image = rng.uniform(-1000, 1000, size=seg.shape).astype(np.float32)
    save_volume(Volume(image, aff), tmp_path / "img.nii.gz")
    assert main(["warp", "--moving", str(tmp_path / "img.nii.gz"), "--field", str(tmp_path / "u.nii.gz"),
                 "--out", str(tmp_path / "wimg.nii.gz"), "--deeds-rules"]) == 0
    from slicreg.io import load_image

    warped = load_image(tmp_path / "wimg.nii.gz").array
    edge = image[np.where(np.arange(6) < 3, 5, 0)]  # axis 0 clamped to the last / first slice
    expected = 0.6 * edge + 0.4 * edge[:, [1, 2, 3, 4, 4]]  # axis 1 at j + 0.4, the index j + 1 clamped
    np.testing.assert_allclose(warped, expected, atol=1e-3, rtol=0)
