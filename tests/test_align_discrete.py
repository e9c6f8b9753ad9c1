"""The engine's discrete search (``StageConfig.discrete``, :mod:`slicreg.alignment.discrete`): a known shift is
found exactly, weights and fields of view are honoured, and -- the registration the issue asks for -- a known
smooth deformation plus a large translation is recovered from a zero field to below one voxel, on a full scan and
on a slab against a full scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slicreg.alignment import register_pair, resolve_preset
from slicreg.alignment.discrete import _nearest_informative, discrete_displacement, displacement_offsets
from slicreg.alignment.similarity import box_filter, mind_ssc
from slicreg.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shifted_pair(shift, radius, shape=(24, 20, 28), seed=0):
    """Fixed MIND features of a smooth random image and the moving features warped by the identity on the fixed
    grid + ``radius`` voxels per side, for a moving image that is the fixed one shifted by ``shift`` voxels
    (moving(x) = fixed(x - shift)): the displacement to find is ``shift`` everywhere."""
    g = torch.Generator().manual_seed(seed)
    margin = radius + max(abs(s) for s in shift) + 2
    big = box_filter(torch.rand((1, 1, *(n + 2 * margin for n in shape)), generator=g), 2)
    feat = mind_ssc(big)
    inner = tuple(slice(margin, margin + n) for n in shape)
    fixed = feat[(slice(None), slice(None), *inner)]
    # warped index w (fixed voxel w - radius) = moving(w - radius) = big feature at w - radius - shift + margin
    cut = tuple(slice(margin - radius - s, margin - radius - s + n + 2 * radius) for s, n in zip(shift, shape))
    return fixed, feat[(slice(None), slice(None), *cut)]


def test_offsets_cover_the_cube_once():
    off = displacement_offsets(2)
    assert off.shape == (125, 3)
    assert len({tuple(o) for o in off.tolist()}) == 125 and int(off.abs().max()) == 2


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_a_whole_voxel_shift_is_found_everywhere(pool):
    shift = (2, -1, 3)
    fixed, warped = _shifted_pair(shift, radius=3)
    d = discrete_displacement(fixed, warped, radius=3, pool=pool)
    assert d.shape == (1, 3, *fixed.shape[2:]) and d.dtype == torch.float32
    np.testing.assert_allclose(d[0].reshape(3, -1).mean(1).numpy(), shift, atol=1e-5)
    np.testing.assert_allclose(d[0].reshape(3, -1).std(1).numpy(), 0, atol=1e-5)


def test_cells_without_fixed_weight_follow_their_neighbours():
    """Half of the fixed grid is noise with zero weight: those cells carry no cost and take the shift of the
    weighted half through the coupling; with the noise weighted, they would pick whatever matches it."""
    shift = (1, 2, -2)
    fixed, warped = _shifted_pair(shift, radius=3)
    noisy = fixed.clone()
    noisy[:, :, :, :, 14:] = torch.rand(noisy[:, :, :, :, 14:].shape, generator=torch.Generator().manual_seed(3))
    weight = torch.zeros((1, 1, *fixed.shape[2:]))
    weight[..., :14] = 1
    d = discrete_displacement(noisy, warped, radius=3, pool=2, fixed_weight=weight)
    # the far end of the unweighted half is several cells from the weighted data: the coupling carries the
    # shift there only approximately
    np.testing.assert_allclose(d[0, :, :, :, :18].reshape(3, -1).mean(1).numpy(), shift, atol=0.1)
    unweighted = discrete_displacement(noisy, warped, radius=3, pool=2)
    assert float((unweighted[0, :, :, :, 16:] - torch.tensor(shift).reshape(3, 1, 1, 1)).abs().mean()) > 0.5


def test_displacements_leaving_the_moving_field_of_view_are_not_chosen():
    """The moving image is the fixed one shifted by +2 voxels along x, and the moving field of view (the warped
    weights) ends where the fixed grid ends: for the last cell along x, +2 reads only outside, so its cost there
    is the cell's worst and its own minimum is elsewhere (the smoothed result drops below 2 there); without the
    weights every cell takes +2."""
    fixed, warped = _shifted_pair((2, 0, 0), radius=3)
    ww = torch.zeros((1, 1, *warped.shape[2:]))
    ww[:, :, : 3 + fixed.shape[2]] = 1
    d = discrete_displacement(fixed, warped, radius=3, pool=2, warped_weight=ww, couplings=())
    assert float(d[0, 0, -1].max()) < 1.9 and float(d[0, 0, :-8].min()) == pytest.approx(2.0)
    plain = discrete_displacement(fixed, warped, radius=3, pool=2, couplings=())
    assert float(plain[0, 0].min()) == pytest.approx(2.0)


@pytest.mark.parametrize("box", [True, False])
def test_the_nearest_cell_with_data_is_the_distance_transforms(box):
    """A box of cells with data (the shortcut) and an irregular set (the distance transform): every cell's
    nearest cell with data is at the smallest distance there is."""
    from scipy.ndimage import distance_transform_edt

    informative = torch.zeros((9, 7, 8), dtype=torch.bool)
    if box:
        informative[2:6, 1:4, 3:7] = True
    else:
        informative[2:6, 1:4, 3:7] = True
        informative[7, 6, 0] = True
    nearest = _nearest_informative(informative)
    coords = np.stack(np.unravel_index(nearest.numpy(), informative.shape), -1).reshape(*informative.shape, 3)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in informative.shape], indexing="ij"), -1)
    got = np.linalg.norm(coords - grid, axis=-1)
    np.testing.assert_allclose(got, distance_transform_edt(~informative.numpy()), atol=1e-9)
    assert informative.reshape(-1)[nearest].all()


def test_bad_arguments_are_one_clear_error():
    fixed, warped = _shifted_pair((0, 0, 0), radius=2)
    with pytest.raises(InputError, match="radius and pool"):
        discrete_displacement(fixed, warped, radius=0)
    with pytest.raises(InputError, match="warped must be"):
        discrete_displacement(fixed, warped, radius=3)
    with pytest.raises(InputError, match="discrete must be"):
        resolve_preset("refine", deformable={"discrete": -1})
    with pytest.raises(InputError, match="needs the 'dense' model"):
        resolve_preset("refine", deformable={"discrete": 2, "model": "svf"})
    with pytest.raises(InputError, match="3 levels"):
        resolve_preset("refine", deformable={"discrete": (2, 0)})


# ------------------------------------------------------------------------------- registration from zero
SHAPE = (64, 56, 72)
GRID = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij"))
TRANSLATION = np.array([11.0, -9.0, 10.0])  # voxels: 2.75, 2.25 and 2.5 voxels of the coarsest level


def _texture(coords, seed=0, n=400):
    """An analytic CT-like texture in HU at voxel positions ``coords`` ``(3, ...)``: random Gaussian blobs."""
    rng = np.random.default_rng(seed)
    out = np.zeros(coords.shape[1:])
    lo, hi = np.full(3, -12.0), np.array(SHAPE) + 12.0
    for _ in range(n):
        c = rng.uniform(lo, hi)
        s, a = rng.uniform(2.0, 5.0), rng.uniform(-300, 500)
        out += a * np.exp(-sum((coords[i] - c[i]) ** 2 for i in range(3)) / (2 * s * s))
    return out.astype(np.float32)


@pytest.fixture(scope="module")
def translated_pair():
    """``fixed(x) = moving(x + u(x))`` for ``u`` = a large translation plus a smooth deformation of up to 2
    voxels, evaluated analytically (no resampling error)."""
    smooth = np.stack([2.0 * np.sin(2 * np.pi * GRID[(a + 1) % 3] / SHAPE[(a + 1) % 3] + a) for a in range(3)])
    truth = (TRANSLATION[:, None, None, None] + smooth).astype(np.float32)
    return _texture(GRID + truth), _texture(GRID), truth


# the refinement preset's levels at 4, 2 and 1 with the discrete search on the first, sized for 64 voxels
KW = {"deformable": {"levels": (4, 2, 1), "iterations": (30, 25, 10), "grid_spacing": (1, 2, 4),
                     "subsample": (1, 2, 2)}}


def _error(disp, truth, cut=(slice(10, -10),) * 3):
    cut = (slice(None), *cut)
    return float(np.linalg.norm(disp[cut] - truth[cut], axis=0).mean())


def test_a_large_translation_and_a_smooth_deformation_are_recovered_from_zero(translated_pair):
    fixed, moving, truth = translated_pair
    kw = {"deformable": {**KW["deformable"], "discrete": (3, 0, 0)}}
    out = register_pair(fixed, moving, preset="refine", **kw)
    assert _error(out.disp_vox, truth) < 1.0, _error(out.disp_vox, truth)
    assert out.info["folding_fraction"] == 0.0
    again = register_pair(fixed, moving, preset="refine", **kw)
    np.testing.assert_array_equal(out.disp_vox, again.disp_vox)  # deterministic
    # the gradient steps alone, from the same zero field, stay far from it
    plain = register_pair(fixed, moving, preset="refine", **KW)
    assert _error(plain.disp_vox, truth) > 3.0, _error(plain.disp_vox, truth)


SLAB = (28, 44)  # the slab's first and last + 1 voxel along the third axis


def _slab(full):
    """A 16-voxel slab of ``full``, padded with air as the preprocessing pads, and its field-of-view mask."""
    z0, z1 = SLAB
    fixed = np.full(SHAPE, -1000.0, np.float32)
    fixed[:, :, z0:z1] = full[:, :, z0:z1]
    mask = np.zeros(SHAPE, bool)
    mask[:, :, z0:z1] = True
    return fixed, mask


def test_a_slab_against_the_full_scan_lands_in_place_with_its_mask(translated_pair):
    """The fixed scan is a 16-voxel slab of the deformed scan, padded with air like the preprocessing pads:
    with its field-of-view mask the slab's content lands where it came from."""
    fixed_full, moving, truth = translated_pair
    z0, z1 = SLAB
    fixed, mask = _slab(fixed_full)
    kw = {"deformable": {**KW["deformable"], "discrete": (3, 0, 0)}}
    out = register_pair(fixed, moving, fixed_mask=mask, preset="refine", **kw)
    cut = (slice(10, -10), slice(10, -10), slice(z0 + 2, z1 - 2))
    assert _error(out.disp_vox, truth, cut) < 1.0, _error(out.disp_vox, truth, cut)
    assert out.info["fov"]["overlap"] > 0.99


# ------------------------------------------------------------------------------- slabs: the affine start
def _affine_field(matrix, shape=SHAPE):
    """``A x - x`` on the grid: the field of the affine map ``matrix`` (fixed voxel -> moving voxel)."""
    g = GRID if shape == SHAPE else np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape],
                                                         indexing="ij"))
    return (np.einsum("ab,b...->a...", matrix[:3, :3], g) + matrix[:3, 3, None, None, None] - g).astype(np.float32)


A_TRUE = np.array([[1.05, 0.02, 0.03, 2.0], [-0.03, 0.97, 0.01, -3.0], [0.02, 0.01, 1.02, 5.0], [0, 0, 0, 1.0]])


def test_affine_from_field_recovers_an_affine_map_and_keeps_a_thin_axis_rigid():
    from slicreg.alignment.engine import affine_from_field

    field = _affine_field(A_TRUE)
    np.testing.assert_allclose(affine_from_field(field), A_TRUE, atol=1e-4)
    thin = affine_from_field(field, thin=(False, False, True))
    np.testing.assert_allclose(thin[2, :3], [0, 0, 1])  # the thin axis' row and column: the identity's
    np.testing.assert_allclose(thin[:3, 2], [0, 0, 1])
    np.testing.assert_allclose(thin[:2, :2], A_TRUE[:2, :2], atol=0.02)
    # only where the field lands inside the moving field of view: a field that is wrong elsewhere does not count
    wrong = field.copy()
    wrong[0, :, :, 36:] += 20.0  # these voxels land outside the moving view below
    moving_mask = np.zeros(SHAPE, bool)
    moving_mask[:, :, :36] = True
    moving_mask[:, :, 34:] = False
    fixed_mask = np.zeros(SHAPE, bool)
    fixed_mask[:, :, :30] = True
    fixed_mask[:, :, 36:] = True
    np.testing.assert_allclose(affine_from_field(wrong, fixed_mask, moving_mask=moving_mask), A_TRUE, atol=1e-3)
    with pytest.raises(InputError, match="selects no voxel"):
        affine_from_field(field, np.zeros(SHAPE, bool))


def test_register_pair_starts_from_an_initial_affine_map():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 100, (24, 20, 28)).astype(np.float32)
    a = A_TRUE.copy()
    out = register_pair(img, img, init_affine=a, preset="affine")  # the affine stage is skipped: a, exactly
    np.testing.assert_allclose(out.affine_vox, a)
    np.testing.assert_allclose(out.disp_vox, _affine_field(a, img.shape), atol=1e-4)
    assert out.info["skipped_stages"] == ["affine"]
    with pytest.raises(InputError, match="not both"):
        register_pair(img, img, init_affine=a, init_disp=np.zeros((3, *img.shape), np.float32))
    with pytest.raises(InputError, match="init_affine must be a finite"):
        register_pair(img, img, init_affine=np.eye(3))


def test_a_slab_is_refined_from_the_affine_map_closest_to_its_field(translated_pair):
    """A slab's initial field that is right as a whole but wrong in its detail (a supervoxel field of a slab):
    ``refine_field`` takes the slab path (the affine map closest to the field over the slab, then the deformable
    stage of ``abdomen-ct``), which ends closer to the truth than refining the field itself."""
    from slicreg.registration import refine_field

    fixed_full, moving, truth = translated_pair
    z0, z1 = SLAB
    fixed, mask = _slab(fixed_full)
    rng = np.random.default_rng(1)
    noise = torch.nn.functional.interpolate(torch.from_numpy(rng.normal(0, 6.0, (1, 3, 4, 4, 5)).astype(np.float32)),
                                            size=SHAPE, mode="trilinear", align_corners=True)[0].numpy()
    rough = truth + noise  # wrong by ~3 voxels in its detail, right on average
    cut = (slice(10, -10), slice(10, -10), slice(z0 + 2, z1 - 2))
    small = {"levels": (4, 2, 1), "iterations": (30, 25, 10), "grid_spacing": (1, 2, 4), "subsample": (1, 2, 2)}
    plain, info = refine_field(fixed, moving, rough, fixed_mask=mask, slab_preset=None, deformable=small)
    assert "slab" not in info
    slab, info = refine_field(fixed, moving, rough, fixed_mask=mask)
    assert info["slab"]["axes"] == [2] and info["preset"] == "refine-slab"
    assert _error(rough, truth, cut) > 2.5
    assert _error(slab, truth, cut) < 1.0, _error(slab, truth, cut)
    assert _error(slab, truth, cut) < _error(plain, truth, cut)
    # slab_deformable reaches the slab preset's deformable stage (and deformable does not)
    _, info = refine_field(fixed, moving, rough, fixed_mask=mask, deformable={"iterations": 7},
                           slab_deformable={"iterations": (3, 4, 5)})
    assert [lv["iterations"] for lv in info["levels"]] == [3, 4, 5]
    # a full field of view never takes the slab path
    _, info = refine_field(fixed_full, moving, rough, fixed_mask=np.ones(SHAPE, bool), iterations=0)
    assert "slab" not in info


def test_the_cost_pass_in_slabs_gives_the_same_displacement(monkeypatch):
    """The cost pass runs over slabs of whole cells (cache-sized): any slab size gives bitwise the same result."""
    import slicreg.alignment.discrete as discrete

    g = torch.Generator().manual_seed(3)
    shape, radius = (21, 9, 11), 2
    fixed = torch.rand(1, 12, *shape, generator=g)
    warped = torch.rand(1, 12, *(n + 2 * radius for n in shape), generator=g)
    wf = (torch.rand(1, 1, *shape, generator=g) > 0.3).float()
    wm = torch.rand(1, 1, *(n + 2 * radius for n in shape), generator=g)
    out = {}
    for voxels in (1 << 40, 400, 1):  # one slab; slabs of 4 rows; one cell row each
        monkeypatch.setattr(discrete, "_CHUNK_VOXELS", voxels)
        out[voxels] = discrete_displacement(fixed, warped, radius=radius, pool=2, fixed_weight=wf, warped_weight=wm)
    for voxels in (400, 1):
        assert torch.equal(out[voxels], out[1 << 40])


def test_the_cell_costs_are_the_squared_feature_differences():
    """Without coupling the result is the smoothed per-cell minimum of the weighted mean of ``|F(y) - W(y + delta)|^2``
    (the cost pass expands the square; a brute-force reference computes it directly)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    shape, radius, pool = (8, 6, 10), 1, 2
    fixed = torch.rand(1, 12, *shape, generator=g)
    warped = torch.rand(1, 12, *(n + 2 * radius for n in shape), generator=g)
    wf = (torch.rand(1, 1, *shape, generator=g) > 0.2).float()
    out = discrete_displacement(fixed, warped, radius=radius, pool=pool, fixed_weight=wf, couplings=())
    offsets = displacement_offsets(radius)
    costs = []
    for dx, dy, dz in (offsets + radius).tolist():
        w = warped[:, :, dx: dx + shape[0], dy: dy + shape[1], dz: dz + shape[2]]
        ssd = ((fixed - w) ** 2).sum(1, keepdim=True)
        costs.append(F.avg_pool3d(ssd * wf, pool) / F.avg_pool3d(wf, pool).clamp_min(1e-12))
    best = offsets.float()[torch.cat(costs, 1)[0].argmin(0)]  # (cells..., 3)
    ref = box_filter(box_filter(best.permute(3, 0, 1, 2)[None], 1), 1)
    ref = F.interpolate(ref, size=shape, mode="trilinear", align_corners=False)
    assert torch.allclose(out, ref, atol=1e-5)
