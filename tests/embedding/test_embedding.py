"""Embeddings: streamed execution equals the full forward pass; modes equal the reference
definitions; world coordinates of patches; dense point queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import data_path
from ctfm.embedding import EmbedOptions, embed_dense, embed_patches, embed_whole
from ctfm.embedding.streaming import streamed_embedding, streamed_features
from ctfm.io import load_ct
from ctfm.models import create_model, pool_embedding
from reference_chains import REFERENCE_CHAINS, load_reference


def narrow_encoder(seed: int = 0, init_filters: int = 4):
    """A small CT-FM-shaped encoder in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    encoder = create_model("ct-fm", init_filters=init_filters).eval()
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return encoder


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2, 3, 5, 16, 17, 33])
@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_streamed_features_equal_the_full_forward(depth, chunk):
    encoder = narrow_encoder()
    x = torch.randn(2, 1, depth, 24, 20)
    with torch.inference_mode():
        full = encoder(x)
    streamed = streamed_features(encoder, x, chunk=chunk)
    for level, (a, b) in enumerate(zip(full, streamed)):
        assert a.shape == b.shape, (level, a.shape, b.shape)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        streamed_embedding(encoder, x, chunk=chunk), pool_embedding(full[-1]), atol=1e-6, rtol=1e-5
    )


def test_streaming_needs_eval_mode_batchnorm():
    encoder = narrow_encoder().train()
    with pytest.raises(ValueError, match="eval mode"):
        streamed_embedding(encoder, torch.randn(1, 1, 8, 16, 16))


@pytest.mark.slow
def test_streamed_full_size_encoder_matches_on_a_slab():
    encoder = narrow_encoder(init_filters=32)
    assert sum(p.numel() for p in encoder.parameters()) == 77_760_992
    x = torch.rand(1, 1, 20, 64, 48)
    with torch.inference_mode():
        full = pool_embedding(encoder(x)[-1])
    assert cosine(streamed_embedding(encoder, x, chunk=6), full) > 0.99999


@pytest.mark.slow
@pytest.mark.realdata
def test_whole_mode_equals_the_reference_definition():
    """extract_feat_LP.py (docs/recipe.md): 1 mm, 320^3 pad/crop, last map average-pooled — here in one full pass."""
    path = data_path("sarcoma_ct/STS_025/CT_image.nii.gz")
    encoder = narrow_encoder()
    ours = embed_whole(encoder, load_ct(path)[0])
    reference_input = REFERENCE_CHAINS["ct-fm-1mm-320"](load_reference(path))
    assert tuple(reference_input.shape) == (1, 320, 320, 320)
    with torch.inference_mode():
        reference = pool_embedding(encoder(reference_input.as_tensor()[None])[-1])[0].numpy()
    assert ours.shape == (64,) and ours.dtype == np.float32
    assert cosine(ours, reference) >= 0.9999
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.realdata
def test_bf16_whole_embedding_is_close_to_fp32():
    path = data_path("sarcoma_ct/STS_019/CT_image.nii.gz")
    encoder = narrow_encoder()
    image = load_ct(path)[0]
    # A 3 mm, 64^3 whole-scan input: bf16 is emulated (~100x slower) on CPUs without native bf16,
    # and the agreement does not depend on the grid.
    from ctfm.preprocess import get_preset

    spec = get_preset("ct-fm-1mm-320").with_(
        name="whole-3mm-64", spacing_mm=(3.0, 3.0, 3.0), patch_size_mm=(192.0, 192.0, 192.0)
    )
    fp32 = embed_whole(encoder, image, EmbedOptions(mode="whole", spec=spec))
    bf16 = embed_whole(encoder, image, EmbedOptions(mode="whole", spec=spec, precision="bf16"))
    assert cosine(fp32, bf16) >= 0.999


@pytest.mark.slow
@pytest.mark.realdata
def test_patches_mode_equals_ct_fm_sliding_windows():
    """CT-FM's feature_extractor.py: ct-fm-patches preprocessing, SlidingWindowSplitter((24,128,128))."""
    from monai.inferers import SlidingWindowSplitter

    path = data_path("sarcoma_ct/STS_019/dicom/image")
    encoder = narrow_encoder()
    grid = embed_patches(encoder, load_ct(path)[0], EmbedOptions(mode="patches", overlap=0.5, batch_size=3))
    reference_input = REFERENCE_CHAINS["ct-fm-patches"](load_reference(path, reader="PydicomReader"))
    vectors, starts = [], []
    with torch.inference_mode():
        for patch, location in SlidingWindowSplitter((24, 128, 128), overlap=0.5)(reference_input.as_tensor()[None]):
            vectors.append(pool_embedding(encoder(patch)[-1])[0].numpy())
            starts.append(location)
    assert grid.embeddings.shape == (len(vectors), 64)
    np.testing.assert_array_equal(grid.starts, np.asarray(starts))
    np.testing.assert_allclose(grid.embeddings, np.stack(vectors), atol=1e-5)
    for how, fn in (("mean", np.mean), ("max", np.max), ("min", np.min)):
        np.testing.assert_allclose(grid.pooled(how), fn(np.stack(vectors), axis=0), atol=1e-5)


@pytest.mark.slow
def test_patch_centres_are_world_millimetres():
    from monai.data import MetaTensor

    from ctfm.preprocess import PreprocessSpec

    # Already at 3x1x1 mm in SPL order: the spec's resampling and orientation keep the grid.
    affine = torch.tensor(
        [[0, 0, -1.0, 50.0], [0, -1.0, 0, 20.0], [3.0, 0, 0, -100.0], [0, 0, 0, 1.0]], dtype=torch.float64
    )
    image = MetaTensor(torch.full((1, 48, 300, 30), 100.0), affine=affine)
    spec = PreprocessSpec(name="t", foreground_crop=None, patch_size_mm=(72.0, 128.0, 128.0))
    grid = embed_patches(narrow_encoder(), image, EmbedOptions(mode="patches", spec=spec))
    # Patch (24, 128, 128) starting at voxel (s, p, l) of the SPL volume [10, 300, 48] ...
    assert grid.patch_size == (24, 128, 128)
    from ctfm.preprocess import preprocess

    prepared = preprocess(image, spec)
    a = np.asarray(prepared.affine)
    for start, centre in zip(grid.starts, grid.centers_mm):
        expected = a[:3, :3] @ (start + (np.array([24, 128, 128]) - 1) / 2) + a[:3, 3]
        np.testing.assert_allclose(centre, expected)
    # The first patch's centre: 11.5 voxels of 3 mm along S from the first row, and so on.
    first = a[:3, :3] @ np.array([11.5, 63.5, 63.5]) + a[:3, 3]
    np.testing.assert_allclose(grid.centers_mm[0], first)


@pytest.mark.slow
def test_dense_features_and_point_queries():
    from monai.data import MetaTensor

    from ctfm.preprocess import PreprocessSpec

    image = MetaTensor(
        torch.randn(1, 40, 48, 64) * 300, affine=torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0], dtype=torch.float64))
    )
    spec = PreprocessSpec(name="t", foreground_crop=None)
    encoder = narrow_encoder()
    dense = embed_dense(encoder, image, EmbedOptions(mode="dense", spec=spec, chunk=5))
    from ctfm.preprocess import preprocess

    prepared = preprocess(image, spec)
    with torch.inference_mode():
        last = encoder(prepared.as_tensor()[None])[-1][0].numpy()
    np.testing.assert_allclose(dense.features, last, atol=1e-5)
    centres = dense.voxel_centers_mm()
    i, j, k = 1, 2, 1
    np.testing.assert_allclose(dense.query(centres[i, j, k] + 0.3), last[:, i, j, k], atol=1e-5)
    np.testing.assert_allclose(dense.affine[:3, :3], np.asarray(prepared.affine)[:3, :3] * 16)


def test_options_are_validated():
    with pytest.raises(ValueError, match="mode"):
        EmbedOptions(mode="slices")
    with pytest.raises(ValueError, match="precision"):
        EmbedOptions(precision="fp8")
    with pytest.raises(ValueError, match="overlap"):
        EmbedOptions(mode="patches", overlap=1.0)
