"""Padding-aware whole-scan embedding: equal to the full forward pass on boxes of scan inside
constant padding (off-centre, touching the boundary, anisotropic, nearly filling the input), and
the dispatch between it and the plain streamed path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_embedding import narrow_encoder

from ctfm.embedding import padding_aware
from ctfm.embedding.padding_aware import cost_ratio, padding_aware_embedding, slice_labels, whole_embedding
from ctfm.models import pool_embedding


def boxed(shape, box, pad_value=0.0, seed=0, batch=1):
    """[batch, 1, *shape] of ``pad_value`` with uniform random values inside ``box`` (slices)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((batch, 1, *shape), pad_value)
    inner = x[(slice(None), 0) + box]
    x[(slice(None), 0) + box] = torch.rand(inner.shape, generator=g)
    return x


def reference(encoder, x):
    with torch.inference_mode():
        return pool_embedding(encoder(x)[-1])


BOXES = {
    "off-centre": ((64, 64, 64), (slice(9, 30), slice(22, 47), slice(35, 58))),
    "touches low ends": ((64, 64, 64), (slice(0, 20), slice(0, 33), slice(0, 64))),
    "touches high ends": ((48, 40, 56), (slice(30, 48), slice(5, 40), slice(30, 56))),
    "anisotropic slab": ((64, 64, 64), (slice(31, 33), slice(10, 54), slice(3, 61))),
    "single voxel": ((40, 36, 44), (slice(17, 18), slice(30, 31), slice(2, 3))),
    "near full": ((48, 48, 48), (slice(1, 47), slice(0, 48), slice(2, 48))),
    "full": ((32, 40, 24), (slice(0, 32), slice(0, 40), slice(0, 24))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BOXES))
@pytest.mark.parametrize("init_filters", [4, 8])
def test_equals_the_full_forward_on_boxes_in_padding(name, init_filters):
    shape, box = BOXES[name]
    encoder = narrow_encoder(seed=init_filters, init_filters=init_filters)
    x = boxed(shape, box, seed=len(name))
    expected = reference(encoder, x)
    for chunk in (1, 5, None):
        torch.testing.assert_close(padding_aware_embedding(encoder, x, chunk=chunk), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 9, 7), (2, 3, 17), (5, 1, 20), (17, 12, 2)])
def test_thin_volumes(shape):
    encoder = narrow_encoder(init_filters=4)
    x = torch.zeros(1, 1, *shape)
    x[0, 0, shape[0] // 2, shape[1] // 2, : shape[2] // 2 + 1] = torch.rand(shape[2] // 2 + 1)
    torch.testing.assert_close(
        padding_aware_embedding(encoder, x, chunk=2), reference(encoder, x), atol=1e-6, rtol=1e-5
    )


def test_nonzero_padding_runs_inside_the_scan_and_batches():
    """Runs of identical slices anywhere (not only zero padding), and B > 1, are handled."""
    encoder = narrow_encoder(init_filters=4)
    x = boxed((56, 48, 40), (slice(5, 50), slice(12, 40), slice(8, 30)), pad_value=0.37, batch=2)
    x[:, :, 20:31] = x[:, :, 20:21].clone()  # a run of 11 identical slices inside the box along D
    x[:, :, :, 25:29] = x[:, :, :, 25:26].clone()
    torch.testing.assert_close(
        padding_aware_embedding(encoder, x, chunk=4), reference(encoder, x), atol=1e-6, rtol=1e-5
    )


def test_bf16_stays_close():
    encoder = narrow_encoder(init_filters=8)
    x = boxed((64, 64, 64), (slice(9, 30), slice(22, 47), slice(35, 58)))
    ours = padding_aware_embedding(encoder, x, autocast_dtype=torch.bfloat16)
    cos = torch.nn.functional.cosine_similarity(ours.double(), reference(encoder, x).double()).item()
    assert cos > 0.999


def test_slice_labels_mark_runs_of_identical_slices():
    x = boxed((10, 6, 8), (slice(3, 5), slice(0, 6), slice(2, 7)))
    assert slice_labels(x, 2).tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 3, 3]
    assert slice_labels(x, 3).tolist() == [0, 1, 2, 3, 4, 5]
    assert slice_labels(x, 4).tolist() == [0, 0, 1, 2, 3, 4, 5, 6]


def test_cost_ratio_reflects_the_fill():
    encoder = narrow_encoder(init_filters=4)
    small = cost_ratio(encoder, boxed((64, 64, 64), (slice(20, 40), slice(20, 40), slice(20, 40))))
    large = cost_ratio(encoder, boxed((64, 64, 64), (slice(4, 60), slice(4, 60), slice(4, 60))))
    full = cost_ratio(encoder, torch.rand(1, 1, 32, 32, 32))
    assert small < large < full == 1.0


@pytest.mark.slow
def test_dispatch_uses_the_streamed_path_when_nothing_is_saved(monkeypatch):
    encoder = narrow_encoder(init_filters=4)
    calls = []
    real = padding_aware.streamed_embedding

    def spy(*args, **kwargs):
        calls.append("streamed")
        return real(*args, **kwargs)

    monkeypatch.setattr(padding_aware, "streamed_embedding", spy)
    dense = torch.rand(1, 1, 32, 32, 32)
    torch.testing.assert_close(whole_embedding(encoder, dense), reference(encoder, dense), atol=1e-6, rtol=1e-5)
    assert calls == ["streamed"]
    sparse = boxed((64, 64, 64), (slice(20, 40), slice(20, 40), slice(20, 40)))
    torch.testing.assert_close(whole_embedding(encoder, sparse), reference(encoder, sparse), atol=1e-6, rtol=1e-5)
    assert calls == ["streamed"]  # the padding-aware path served the small box
    whole_embedding(encoder, sparse, max_cost_ratio=0.0)
    assert calls == ["streamed", "streamed"]


@pytest.mark.slow
def test_full_size_encoder_matches_on_a_small_box():
    encoder = narrow_encoder(init_filters=32)
    x = boxed((32, 80, 64), (slice(6, 26), slice(30, 70), slice(10, 40)))
    ours, expected = padding_aware_embedding(encoder, x), reference(encoder, x)
    a, b = ours.double().numpy().ravel(), expected.double().numpy().ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99999
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
