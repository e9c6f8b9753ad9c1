"""Registration by supervoxels: prediction plumbing (grids, dtypes) and the flow wrapper."""

import numpy as np
import pytest
import torch

from slicreg.errors import InputError
from slicreg.register import predict_supervoxels, register_preprocessed, register_supervoxel_maps, \
    upsample_labels_stride2


def test_upsample_stride2_puts_output_voxel_q_at_input_voxel_2q():
    lab = torch.arange(3 * 4 * 5, dtype=torch.int64).reshape(1, 3, 4, 5)
    up = upsample_labels_stride2(lab)
    assert up.shape == (1, 6, 8, 10)
    for p in range(6):  # input voxel p takes output voxel floor(p / 2 + 0.5), clamped
        q = min((p + 1) // 2, 2)
        assert torch.equal(up[0, p, ::2, ::2], lab[0, q])
    with pytest.raises(InputError):
        upsample_labels_stride2(lab[0])


def test_predict_supervoxels_shapes_and_eval_mode():
    from slicreg.network import build_model

    model = build_model(seed=0, backward="eager")
    model.train()
    image = np.random.default_rng(0).normal(0, 200, size=(32, 32, 48)).astype(np.float32)
    sv = predict_supervoxels(model, image)
    assert sv.dtype == np.uint8 and sv.shape == (16, 16, 16, 24)
    assert not model.training  # BatchNorm running statistics, no dropout
    again = predict_supervoxels(model, image)
    np.testing.assert_array_equal(sv, again)  # deterministic in eval mode
    with pytest.raises(InputError, match="divisible by 8"):
        predict_supervoxels(model, image[:30])


def blocks(shape, size, offset=(0, 0, 0)):
    """16 layers of block supervoxels (labels 1..), shifted by `offset` voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    layers = []
    for layer in range(16):
        shift = np.array([layer % 3, (layer // 3) % 3, layer % 5])
        cells = [(grid[a] - offset[a] + shift[a]) // size for a in range(3)]
        ncell = [int(np.ceil((n + 8) / size)) + 1 for n in shape]
        lab = (cells[0] * ncell[1] * ncell[2] + cells[1] * ncell[2] + cells[2]) % 127 + 1
        layers.append(lab)
    return np.stack(layers).astype(np.uint8)


def test_identity_pair_gives_near_zero_field():
    sv = blocks((24, 20, 28), 6)
    result = register_supervoxel_maps(sv, sv, iterations=20, init="zero")
    assert result.disp_vox.shape == (3, 48, 40, 56)
    assert np.abs(result.disp_vox).max() < 0.5
    assert result.info["n_keypoints"] > 16


def test_register_preprocessed_needs_matching_shapes():
    with pytest.raises(InputError, match="same shape"):
        register_preprocessed(None, np.zeros((32, 32, 32)), np.zeros((32, 32, 40)))
    with pytest.raises(InputError, match="template_supervoxels"):
        register_preprocessed(None, np.zeros((32, 32, 32)), np.zeros((32, 32, 32)),
                              fixed_sv=np.zeros((16, 16, 16, 16), np.uint8), moving_is_template=True)
