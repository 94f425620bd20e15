"""Every evaluation metric against values worked out by hand on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctfm.errors import CTInputError, OptionError
from ctfm.evaluate.zeroshot import clustering, retrieval, saliency, stability
from ctfm.evaluate.zeroshot.concepts import pca_colours
from ctfm.evaluate.zeroshot.inputs import StoreVectors


# ---- retrieval -----------------------------------------------------------------------------
def test_ap_hr_f1_at_k_by_hand():
    # hits at ranks 2 and 3: precisions 1/2 and 2/3 -> AP = 7/12
    assert retrieval.ap_at_k([0, 1, 1], 3) == pytest.approx(7 / 12)
    # hits at ranks 1, 3 (and 4, outside k=3): (1 + 2/3) / 2
    assert retrieval.ap_at_k([1, 0, 1, 1], 3) == pytest.approx(5 / 6)
    assert retrieval.ap_at_k([1, 0, 1, 1], 4) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert retrieval.ap_at_k([0, 0, 0, 1], 3) == 0.0
    assert retrieval.hit_rate_at_k([0, 0, 1], 2) == 0.0
    assert retrieval.hit_rate_at_k([0, 0, 1], 3) == 1.0
    assert retrieval.f1_of(7 / 12, 1.0) == pytest.approx(2 * (7 / 12) / (7 / 12 + 1))
    assert retrieval.f1_of(0.0, 0.0) == 0.0


def test_precision_and_ranked_average_precision_by_hand():
    assert retrieval.precision_at_k([1, 0, 1, 1, 0], 3) == pytest.approx(2 / 3)
    assert retrieval.precision_at_k([1, 0, 1, 1, 0], 5) == pytest.approx(3 / 5)
    with pytest.raises(OptionError):
        retrieval.precision_at_k([1, 0], 3)
    # sklearn's AP with rank scores n..1 equals the mean precision at the hits
    assert retrieval.ranked_average_precision([0, 1, 1]) == pytest.approx(7 / 12)
    assert retrieval.ranked_average_precision([1, 0, 1, 1, 0]) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert retrieval.ranked_average_precision([0, 0, 0]) == 0.0


def test_rank_l2_and_cosine_by_hand():
    gallery = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 10.0], [1.0, 1.0]])
    order, dist = retrieval.rank(np.array([[2.0, 0.0]]), gallery, "l2", 3)
    assert order.tolist() == [[1, 3, 0]]  # distances 1, sqrt(2), 2
    assert dist[0].tolist() == pytest.approx([1.0, math.sqrt(2), 2.0])
    order, dist = retrieval.rank(np.array([[2.0, 0.0]]), gallery[1:], "cosine", 3)
    assert order.tolist() == [[0, 2, 1]]  # 1 - cos: 0, 1 - 1/sqrt(2), 1
    assert dist[0].tolist() == pytest.approx([0.0, 1 - 1 / math.sqrt(2), 1.0])
    with pytest.raises(OptionError):
        retrieval.rank(np.zeros((1, 2)), gallery, "manhattan")


def test_label_retrieval_metrics_by_hand():
    gallery_labels = np.array([0, 1, 1, 0, 2])
    neighbours = np.array([[1, 0, 2, 3, 4], [4, 3, 0, 1, 2]])  # query 0: label 1; query 1: label 2
    m = retrieval.label_retrieval_metrics(np.array([1, 2]), gallery_labels, neighbours, ks=(3, 5))
    # query 0 relevance [1,0,1,0,0]: AP@3 = (1 + 2/3)/2, HR 1; query 1 [1,0,0,0,0]: AP 1, HR 1
    assert m["AP@3"].tolist() == pytest.approx([5 / 6, 1.0])
    assert m["HR@5"].tolist() == [1.0, 1.0]
    assert m["F1@3"][0] == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))


def _vectors(names, matrix):
    return StoreVectors(
        "store", {"mode": "patches"}, list(names), [f"/data/{n}.nii.gz" for n in names], np.asarray(matrix, np.float32)
    )


def test_mir_protocol_by_hand():
    # group "liver": two test scans, three train scans; relevance: same flag
    names = ["q1", "q2", "t1", "t2", "t3"]
    matrix = [[1, 0], [0, 1], [1, 0.1], [0.1, 1], [1, 1]]
    sheet = [
        {"scan": "q1", "split": "test", "group": "liver", "flag": "1"},
        {"scan": "q2", "split": "test", "group": "liver", "flag": "0"},
        {"scan": "t1", "split": "train", "group": "liver", "flag": "1"},
        {"scan": "t2.nii.gz", "split": "train", "group": "liver", "flag": "1"},  # matched by file name
        {"scan": "t3", "split": "train", "group": "liver", "flag": "0"},
    ]
    run = retrieval.mir_retrieval(_vectors(names, matrix), sheet, ["flag"], ks=(1, 3))
    # q1 -> t1, t3, t2: relevance [1, 0, 1] -> P@1 1, P@3 2/3, AP (1 + 2/3)/2
    # q2 -> t2, t3, t1: relevance [0, 1, 0] -> P@1 0, P@3 1/3, AP 1/2
    q1, q2 = run["per_query"]
    assert q1["retrieved"] == ["t1", "t3", "t2.nii.gz"]
    assert (q1["flag P@1"], q1["flag P@3"], q1["flag AP"]) == pytest.approx((1.0, 2 / 3, 5 / 6))
    assert (q2["flag P@1"], q2["flag P@3"], q2["flag AP"]) == pytest.approx((0.0, 1 / 3, 0.5))
    assert run["groups"]["liver"]["flag AP"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert run["overall"]["flag P@3"]["mean"] == pytest.approx(0.5)


def test_mir_refuses_unknown_scans_and_small_galleries():
    vectors = _vectors(["q1", "t1"], [[1, 0], [0, 1]])
    with pytest.raises(CTInputError, match="not in the store"):
        retrieval.mir_retrieval(
            vectors, [{"scan": "nope", "split": "test", "flag": 1}], ["flag"], group_column=None, ks=(1,)
        )
    with pytest.raises(CTInputError, match="fewer than k=3"):
        retrieval.mir_retrieval(
            vectors,
            [{"scan": "q1", "split": "test", "flag": 1}, {"scan": "t1", "split": "train", "flag": 1}],
            ["flag"],
            group_column=None,
            ks=(3,),
        )


def test_organmnist_loader_scales_and_transposes(tmp_path):
    images = np.arange(2 * 4 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 4)
    np.savez(
        tmp_path / "o.npz",
        **{f"{s}_images": images for s in ("train", "val", "test")},
        **{f"{s}_labels": np.array([[0], [3]]) for s in ("train", "val", "test")},
    )
    splits = retrieval.load_organmnist3d(tmp_path / "o.npz", "retrieval")
    volumes, labels = splits["train"]
    assert labels.tolist() == [0, 3]
    assert volumes[1, 3, 2, 1] == pytest.approx(images[1, 1, 2, 3] / 255.0)  # axes (0, 3, 2, 1)
    with pytest.raises(CTInputError, match="no train_images"):
        np.savez(tmp_path / "bad.npz", x=images)
        retrieval.load_organmnist3d(tmp_path / "bad.npz")


# ---- clustering ----------------------------------------------------------------------------
def test_silhouette_knn_ari_by_hand():
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = ["a", "a", "b", "b"]
    # cosine distances: a-a 0, a-b1 1, a-b2 1-1/sqrt2, b1-b2 1-1/sqrt2
    d = 1 - 1 / math.sqrt(2)
    expected = (1 + 1 + (1 - d) / 1 + 0) / 4  # s(b2): a = d, b = d -> 0
    assert clustering.silhouette(vectors, labels) == pytest.approx(expected)
    # leave-one-out 1-NN: a1->a2 ok, a2->a1 ok, b1->b2 ok, b2 -> a1 (cos 0.707 ties a2; first) wrong... b2's
    # nearest are a1, a2 (cos 1/sqrt2) and b1 (cos 1/sqrt2): all tied, the first in rank order is a1
    assert clustering.knn_accuracy(vectors, labels, k=1) == pytest.approx(3 / 4)
    separable = np.array([[1, 0.01], [1, -0.01], [0.01, 1], [-0.01, 1], [1, 0.02], [0.02, 1]])
    assert clustering.kmeans_ari(separable, [0, 0, 1, 1, 0, 1]) == pytest.approx(1.0)
    assert clustering.knn_accuracy(separable, [0, 0, 1, 1, 0, 1], k=3) == 1.0
    with pytest.raises(OptionError):
        clustering.silhouette(vectors, ["a"] * 4)


# ---- stability -----------------------------------------------------------------------------
def test_icc_2_1_by_hand():
    # subjects 1..3 measured twice; session 2 is session 1 + 1: MS_R 8, MS_C 1.5, MS_E 0
    y = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert stability.icc_2_1(y) == pytest.approx(8 / (8 + 2 * 1.5 / 3))
    assert stability.icc_2_1(np.array([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])) == pytest.approx(1.0)
    # per dimension: two columns at once
    both = np.stack([y, np.array([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])], axis=-1)
    assert stability.icc_2_1(both).tolist() == pytest.approx([8 / 9, 1.0])


def test_pair_statistics_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0]])
    stats = stability.pair_statistics(a, b)
    assert stats["pair_cosine"].tolist() == pytest.approx([1 / math.sqrt(1.01), 1 / math.sqrt(1.01), 1 / math.sqrt(2)])
    # a1 = (1,0) is closest to b3 = (1,0) (cos 1 > 0.995); a3 = (1,1) to b1 (1.1/sqrt(2.02) = 0.774 > 0.707)
    assert stats["rank1_a_to_b"].tolist() == [0.0, 1.0, 0.0]
    assert stats["rank1_b_to_a"].tolist() == [1.0, 1.0, 0.0]  # b3 = (1,0) is closest to a1
    non, pairs = stats["non_pair_cosine"], stats["pair_cosine"]
    assert len(non) == 6
    expected_auc = np.mean([[float(p > q) + 0.5 * float(p == q) for q in non] for p in pairs])
    assert stats["separation_auc"] == pytest.approx(expected_auc)
    grouped = stability.pair_statistics(a, b, subjects=["s1", "s2", "s1"])
    assert grouped["rank1_a_to_b"].tolist() == [1.0, 1.0, 1.0]  # b3 and b1 are subject s1's too
    assert len(grouped["non_pair_cosine"]) == 4


# ---- saliency ------------------------------------------------------------------------------
def test_onto_grid_and_saliency_in_label_by_hand():
    values = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    same = saliency.onto_grid(values, np.eye(4), np.eye(4), (2, 2, 2), order=0)
    assert same.tolist() == values.tolist()
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])  # a 2 mm grid; the 1 mm grid's voxel 2 is its voxel 1
    fine = saliency.onto_grid(values, coarse, np.eye(4), (4, 4, 4), order=0)
    assert fine[2, 2, 2] == values[1, 1, 1] and fine[0, 0, 0] == values[0, 0, 0]
    sal = np.zeros((10, 10, 1))
    sal[0, 0, 0] = 9.0
    sal[1, 0, 0] = 1.0
    labels = np.zeros((10, 10, 1))
    labels[0, :, 0] = 1
    result = saliency.saliency_in_label(sal, labels)
    assert result["mean_inside"] == pytest.approx(0.9) and result["mean_outside"] == pytest.approx(1 / 90)
    assert result["top1pct_inside_fraction"] == 1.0 and result["label_fraction_of_volume"] == 0.1


@pytest.mark.slow
def test_occlusion_saliency_is_one_minus_cosine():
    from ctfm.models import init_model

    encoder = init_model("ct-fm", seed=0, init_filters=4).eval()
    volume = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    sal = saliency.occlusion_saliency(encoder, volume, mask_size=8, overlap=0.25, n_batch=4)
    assert sal.shape == (16, 16, 16)
    assert sal.min() >= -1e-6 and sal.max() <= 2.0 and sal.max() > 0
    # an encoder's embedding of the unchanged volume has change 0
    with torch.inference_mode():
        change = saliency.EmbeddingChange(encoder, encoder.embed(volume)[0])(volume)
    assert float(change) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(OptionError):
        saliency.occlusion_saliency(encoder, volume, mask_size=32)


# ---- concepts ------------------------------------------------------------------------------
def test_pca_colours_separate_two_regions():
    rng = np.random.default_rng(0)
    features = rng.normal(0, 0.01, size=(8, 4, 4, 4))
    features[:, :2] += np.array([5, -5, 0, 0, 0, 0, 0, 0])[:, None, None, None]
    mask = np.ones((4, 4, 4), bool)
    mask[3, 3, 3] = False
    (rgb,), explained = pca_colours([features], [mask])
    assert rgb.shape == (4, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert explained[0] > 2 / 8  # z-scored per channel: two of eight channels carry the split
    gap = abs(rgb[:2, ..., 0].mean() - rgb[2:3, ..., 0].mean())  # the two regions at the two ends of PC1
    assert gap > 0.5 and gap > 4 * rgb[:2, ..., 0].std()
    assert rgb[3, 3, 3].tolist() == [0, 0, 0]  # outside the mask


# ---- semantic search -----------------------------------------------------------------------
def test_centroid_label_at_and_label_value_by_hand():
    from ctfm.evaluate.zeroshot import semantic_search

    labels = np.zeros((4, 4, 4), int)
    labels[0, 0, 0] = labels[2, 0, 0] = 7
    affine = np.diag([2.0, 3.0, 1.0, 1.0])
    affine[:3, 3] = [10.0, 0.0, -5.0]
    assert semantic_search.centroid_mm(labels, affine, 7).tolist() == pytest.approx(
        [12.0, 0.0, -5.0]
    )  # voxel (1, 0, 0)
    assert semantic_search.centroid_mm(labels, affine, 3) is None
    assert semantic_search.label_at(labels, affine, [14.4, 1.0, -5.2]) == 7  # nearest voxel (2, 0, 0)
    assert semantic_search.label_at(labels, affine, [12.0, 0.0, -5.0]) == 0  # the centroid itself is not in the label
    assert semantic_search.label_at(labels, affine, [100.0, 0.0, 0.0]) == 0  # outside the grid
    names = {7: "Heart", 3: "liver"}
    assert semantic_search.label_value(names, "heart") == 7 and semantic_search.label_value(names, "3") == 3
    with pytest.raises(CTInputError, match="no label named 'lung'"):
        semantic_search.label_value(names, "lung")
    summary = semantic_search.summarise_label(
        [{"error_mm": 10.0, "inside_label": True}, {"error_mm": 30.0, "inside_label": False}]
    )
    assert (summary["error_mm_mean"], summary["error_mm_median"], summary["inside_label_rate"]) == (20.0, 20.0, 0.5)
    assert summary["error_mm_sd"] == pytest.approx(math.sqrt(200.0))
