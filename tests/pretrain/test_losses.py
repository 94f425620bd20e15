"""Tests of the pre-training losses against plain-loop references written from their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ctfm.pretrain.losses import (
    LOSSES,
    IntraSampleNTXentLoss,
    IntraSampleWrapper,
    NTXentLoss,
    SimSiamLoss,
    VICRegLoss,
    build_loss,
    stack_views,
)

DOUBLE = torch.float64


def random_embeddings(*shape: int, seed: int = 0, dtype=DOUBLE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Plain-loop references, written from the definitions (docs/recipe.md; SimCLR; VICReg)
# ---------------------------------------------------------------------------------------------


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector]


def _dot(first: list[float], second: list[float]) -> float:
    return sum(a * b for a, b in zip(first, second))


def _cross_entropy_first(logits: list[float]) -> float:
    """-log softmax(logits)[0], with the max subtracted for stability."""
    top = max(logits)
    return math.log(sum(math.exp(value - top) for value in logits)) + top - logits[0]


def reference_intrasample_ntxent(z: torch.Tensor, temperature: float) -> list[list[float]]:
    """Triple loop over images b, crops i, and candidates: per-anchor losses [B][N]."""
    batch, crops = z.shape[:2]
    vectors = [[[_unit(z[b, i, v].tolist()) for v in range(2)] for i in range(crops)] for b in range(batch)]
    losses = []
    for b in range(batch):
        row = []
        for i in range(crops):
            anchor = vectors[b][i][0]
            logits = [_dot(anchor, vectors[b][i][1]) / temperature]  # positive first
            for j in range(crops):
                if j == i:
                    continue
                for v in range(2):
                    logits.append(_dot(anchor, vectors[b][j][v]) / temperature)
            assert len(logits) == 1 + 2 * (crops - 1)
            row.append(_cross_entropy_first(logits))
        losses.append(row)
    return losses


def reference_ntxent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> list[float]:
    """SimCLR over 2B views, loop over anchors: per-anchor losses in the order z0 rows, z1 rows."""
    batch = z0.shape[0]
    views = [_unit(row.tolist()) for row in z0] + [_unit(row.tolist()) for row in z1]
    losses = []
    for anchor in range(2 * batch):
        partner = (anchor + batch) % (2 * batch)
        logits = [_dot(views[anchor], views[partner]) / temperature]
        logits += [
            _dot(views[anchor], views[other]) / temperature
            for other in range(2 * batch)
            if other not in (anchor, partner)
        ]
        losses.append(_cross_entropy_first(logits))
    return losses


def reference_vicreg_terms(z0: torch.Tensor, z1: torch.Tensor, eps: float = 1e-4) -> tuple[float, float, float]:
    batch, dim = z0.shape
    invariance = sum((z0[b, d] - z1[b, d]).item() ** 2 for b in range(batch) for d in range(dim)) / (batch * dim)

    def hinge(z):
        return sum(max(0.0, 1.0 - math.sqrt(torch.var(z[:, d]).item() + eps)) for d in range(dim)) / dim

    def off_diagonal(z):
        covariance = torch.cov(z.T)  # unbiased, [D, D]
        return sum(covariance[i, j].item() ** 2 for i in range(dim) for j in range(dim) if i != j) / dim

    return invariance, (hinge(z0) + hinge(z1)) / 2, off_diagonal(z0) + off_diagonal(z1)


# ---------------------------------------------------------------------------------------------
# Intra-sample NT-Xent
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, crops, dim", [(1, 2, 3), (2, 3, 4), (3, 5, 8), (2, 15, 16)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_intrasample_matches_triple_loop(batch, crops, dim, temperature):
    z = random_embeddings(batch, crops, 2, dim, seed=batch * 100 + crops)
    expected = torch.tensor(reference_intrasample_ntxent(z, temperature), dtype=DOUBLE)
    per_anchor = IntraSampleNTXentLoss(temperature, reduction="none")(z)
    assert per_anchor.shape == (batch, crops)
    torch.testing.assert_close(per_anchor, expected, rtol=0, atol=1e-10)
    mean = IntraSampleNTXentLoss(temperature)(z)
    assert mean.ndim == 0
    assert abs(mean.item() - expected.mean().item()) < 1e-10
    assert abs(IntraSampleNTXentLoss(temperature, reduction="sum")(z).item() - expected.sum().item()) < 1e-9


def test_intrasample_accepts_ctfm_nesting():
    batch, crops, dim = 3, 4, 5
    z = random_embeddings(batch, crops, 2, dim, seed=1)
    nested = [[z[:, i, 0].clone(), z[:, i, 1].clone()] for i in range(crops)]  # list[N] of list[2] of [B, D]
    stacked = stack_views(nested)
    assert stacked.shape == (batch, crops, 2, dim)
    assert torch.equal(stacked, z)
    assert torch.equal(stack_views(tuple(tuple(views) for views in nested)), z)
    loss = IntraSampleNTXentLoss()
    assert loss(nested).item() == loss(z).item()


def test_intrasample_gradient_flows():
    z = random_embeddings(2, 4, 2, 6, seed=2).requires_grad_(True)
    IntraSampleNTXentLoss()(z).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("crops", [2, 5, 15])
def test_intrasample_analytic_value(temperature, crops):
    # Both views of crop i are e_i (scaled): positives have cosine 1, negatives cosine 0, so
    # loss = -log(e^{1/t} / (e^{1/t} + 2(N-1) e^0)) = log(1 + 2(N-1) e^{-1/t}) for every anchor.
    dim = crops + 1
    basis = torch.eye(dim, dtype=DOUBLE)[:crops]  # [N, D]
    z = torch.stack((basis, 3.0 * basis), dim=1).unsqueeze(0).repeat(2, 1, 1, 1)  # [2, N, 2, D]
    expected = math.log(1.0 + 2 * (crops - 1) * math.exp(-1.0 / temperature))
    per_anchor = IntraSampleNTXentLoss(temperature, reduction="none")(z)
    torch.testing.assert_close(per_anchor, torch.full((2, crops), expected, dtype=DOUBLE), rtol=0, atol=1e-12)


def test_intrasample_is_invariant_to_scale_and_image_order():
    z = random_embeddings(4, 5, 2, 8, seed=3)
    loss = IntraSampleNTXentLoss(reduction="none")
    per_anchor = loss(z)
    permutation = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(loss(z[permutation]), per_anchor[permutation], rtol=0, atol=1e-12)
    assert abs(IntraSampleNTXentLoss()(z[permutation]).item() - per_anchor.mean().item()) < 1e-12
    torch.testing.assert_close(loss(7.5 * z), per_anchor, rtol=0, atol=1e-12)


def test_intrasample_has_no_cross_image_negatives():
    z = random_embeddings(3, 4, 2, 6, seed=4)
    other_image = random_embeddings(1, 4, 2, 6, seed=5)
    loss = IntraSampleNTXentLoss(reduction="none")
    alone = loss(z)
    with_other = loss(torch.cat((z[:1], other_image, z[1:])))
    torch.testing.assert_close(with_other[[0, 2, 3]], alone, rtol=0, atol=1e-12)
    # An image made of copies of another image's embeddings would be the hardest cross-image
    # negative there is; it still does not change the first image's losses.
    torch.testing.assert_close(loss(torch.cat((z[:1], z[:1].flip(1))))[0], alone[0], rtol=0, atol=1e-12)


def test_intrasample_is_the_view0_half_of_symmetric_per_image_ntxent():
    z = random_embeddings(3, 6, 2, 8, seed=6)
    intrasample = IntraSampleNTXentLoss(0.2, reduction="none")(z)
    symmetric = NTXentLoss(0.2, reduction="none")
    for image in range(3):
        per_anchor = symmetric(z[image, :, 0], z[image, :, 1])  # [2, N], row 0: view-0 anchors
        torch.testing.assert_close(intrasample[image], per_anchor[0], rtol=0, atol=1e-12)


def test_intrasample_variance_term():
    z = random_embeddings(3, 4, 2, 5, seed=7) * 0.3
    plain = IntraSampleNTXentLoss(0.1)(z).item()
    variance = 0.0
    for view in range(2):
        samples = z[:, :, view].reshape(-1, 5)
        variance += sum(max(0.0, 1 - math.sqrt(torch.var(samples[:, d]).item() + 1e-4)) for d in range(5)) / 5 / 2
    assert variance > 0
    blended = IntraSampleNTXentLoss(0.1, variance_weight=0.25)
    assert abs(blended(z).item() - (0.75 * plain + 0.25 * variance)) < 1e-12
    assert abs(IntraSampleNTXentLoss(0.1, variance_weight=1.0)(z).item() - variance) < 1e-12
    per_anchor = IntraSampleNTXentLoss(0.1, variance_weight=0.25, reduction="none")(z)
    assert per_anchor.shape == (3, 4) and abs(per_anchor.mean().item() - blended(z).item()) < 1e-12
    # Spread-out embeddings (std >= 1 per feature) make the variance term vanish.
    wide = z * 100
    assert (
        abs(
            IntraSampleNTXentLoss(0.1, variance_weight=0.5)(wide).item() - 0.5 * IntraSampleNTXentLoss(0.1)(wide).item()
        )
        < 1e-12
    )


@pytest.mark.parametrize(
    "make_call, message",
    [
        (lambda: IntraSampleNTXentLoss()(torch.zeros(2, 1, 2, 4)), "N >= 2"),
        (lambda: IntraSampleNTXentLoss()(torch.zeros(2, 3, 3, 4)), "expected \\[B, N, 2, D\\]"),
        (lambda: IntraSampleNTXentLoss()(torch.zeros(3, 2, 4)), "expected \\[B, N, 2, D\\]"),
        (lambda: IntraSampleNTXentLoss(temperature=0.0), "temperature=0.0"),
        (lambda: IntraSampleNTXentLoss(variance_weight=1.5), "variance_weight=1.5"),
        (lambda: IntraSampleNTXentLoss(reduction="avg"), "reduction='avg'"),
        (lambda: stack_views([[torch.zeros(2, 4)]]), "exactly 2 views"),
        (lambda: stack_views([[torch.zeros(2, 4), torch.zeros(3, 4)]]), "differs"),
        (lambda: NTXentLoss()(torch.zeros(1, 4), torch.zeros(1, 4)), ">= 2 samples"),
        (lambda: NTXentLoss()(torch.zeros(3, 4), torch.zeros(2, 4)), "same \\[B, D\\] shape"),
        (lambda: VICRegLoss()(torch.zeros(1, 4), torch.zeros(1, 4)), ">= 2 samples"),
        (lambda: IntraSampleWrapper(NTXentLoss(gather_distributed=True)), "gather_distributed=True"),
        (lambda: build_loss("barlow"), "intrasample_ntxent"),
    ],
)
def test_bad_inputs_raise_value_errors(make_call, message):
    with pytest.raises(ValueError, match=message):
        make_call()


# ---------------------------------------------------------------------------------------------
# Cross-sample NT-Xent (SimCLR), with and without gathering
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, dim", [(2, 3), (5, 8), (16, 4)])
@pytest.mark.parametrize("temperature", [0.1, 0.7])
def test_ntxent_matches_loop(batch, dim, temperature):
    z0, z1 = random_embeddings(batch, dim, seed=batch), random_embeddings(batch, dim, seed=batch + 50)
    expected = reference_ntxent(z0, z1, temperature)
    per_anchor = NTXentLoss(temperature, reduction="none")(z0, z1)
    assert per_anchor.shape == (2, batch)
    torch.testing.assert_close(per_anchor.reshape(-1), torch.tensor(expected, dtype=DOUBLE), rtol=0, atol=1e-10)
    assert abs(NTXentLoss(temperature)(z0, z1).item() - sum(expected) / len(expected)) < 1e-10
    # One stacked [B, 1, 2, D] tensor is the same batch.
    stacked = torch.stack((z0, z1), dim=1).unsqueeze(1)
    assert abs(NTXentLoss(temperature)(stacked).item() - sum(expected) / len(expected)) < 1e-12


def test_ntxent_gather_without_process_group_changes_nothing():
    z0, z1 = random_embeddings(4, 6, seed=8), random_embeddings(4, 6, seed=9)
    assert not dist.is_initialized()
    assert NTXentLoss(gather_distributed=True)(z0, z1).item() == NTXentLoss()(z0, z1).item()


def test_ntxent_gather_with_world_size_one_equals_no_gather(tmp_path):
    z0 = random_embeddings(4, 6, seed=10).requires_grad_(True)
    z1 = random_embeddings(4, 6, seed=11).requires_grad_(True)
    expected = NTXentLoss()(z0, z1)
    expected_gradients = torch.autograd.grad(expected, (z0, z1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        gathered = NTXentLoss(gather_distributed=True)(z0, z1)
        gradients = torch.autograd.grad(gathered, (z0, z1))
    finally:
        dist.destroy_process_group()
    assert abs(gathered.item() - expected.item()) < 1e-14
    for got, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def _gathered_ntxent_worker(rank: int, world_size: int, rendezvous: str, z0_global, z1_global, output_folder: str):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        local = z0_global.shape[0] // world_size
        rows = slice(rank * local, (rank + 1) * local)
        z0 = z0_global[rows].clone().requires_grad_(True)
        z1 = z1_global[rows].clone().requires_grad_(True)
        loss = NTXentLoss(temperature=0.2, gather_distributed=True)(z0, z1)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad0": z0.grad, "grad1": z1.grad}, f"{output_folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ntxent_gather_two_processes_matches_concatenated_batch(tmp_path):
    world_size, local, dim = 2, 3, 5
    z0 = random_embeddings(world_size * local, dim, seed=12)
    z1 = random_embeddings(world_size * local, dim, seed=13)
    mp.spawn(
        _gathered_ntxent_worker,
        args=(world_size, str(tmp_path / "rendezvous"), z0, z1, str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    # Expected, on the whole batch in this process.
    z0_leaf, z1_leaf = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
    per_anchor = NTXentLoss(temperature=0.2, reduction="none")(z0_leaf, z1_leaf)  # [2, W*B]
    global_loss = per_anchor.mean()
    global_loss.backward()
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
    for rank, result in enumerate(results):
        rows = slice(rank * local, (rank + 1) * local)
        # Each rank scores its own anchors against all 2*W*B - 2 negatives...
        assert abs(result["loss"].item() - per_anchor[:, rows].mean().item()) < 1e-12
        # ...and its embeddings get the gradient of every rank's loss: DDP's average over ranks
        # then gives exactly the gradient of the loss on the concatenated batch.
        for name, leaf in (("grad0", z0_leaf), ("grad1", z1_leaf)):
            assert result[name] is not None and result[name].abs().sum() > 0
            torch.testing.assert_close(result[name] / world_size, leaf.grad[rows], rtol=0, atol=1e-12)
    # The mean of the rank losses is the single-process loss of the concatenated batch.
    assert abs(sum(result["loss"].item() for result in results) / world_size - global_loss.item()) < 1e-12


# ---------------------------------------------------------------------------------------------
# SimSiam
# ---------------------------------------------------------------------------------------------


def test_simsiam_identical_inputs_give_minus_one():
    z = random_embeddings(6, 8, seed=14)
    assert abs(SimSiamLoss()(z, z, z, z).item() + 1.0) < 1e-12
    assert abs(SimSiamLoss()(z, z, -z, -z).item() - 1.0) < 1e-12


def test_simsiam_value_and_stop_gradient():
    z0, z1, p0, p1 = (random_embeddings(5, 7, seed=seed).requires_grad_(True) for seed in (15, 16, 17, 18))
    loss = SimSiamLoss()(z0, z1, p0, p1)
    expected = -0.5 * F.cosine_similarity(p0, z1).mean() - 0.5 * F.cosine_similarity(p1, z0).mean()
    assert -1.0 <= loss.item() <= 1.0
    assert abs(loss.item() - expected.item()) < 1e-12
    loss.backward()
    assert z0.grad is None and z1.grad is None  # stop-gradient on the projections
    assert p0.grad is not None and p0.grad.abs().sum() > 0
    assert p1.grad is not None and p1.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# VICReg
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, dim, scale", [(4, 3, 1.0), (8, 6, 0.3), (16, 5, 2.0)])
def test_vicreg_matches_reference(batch, dim, scale):
    z0 = random_embeddings(batch, dim, seed=batch) * scale
    z1 = z0 + 0.5 * random_embeddings(batch, dim, seed=batch + 1)
    invariance, variance, covariance = reference_vicreg_terms(z0, z1)
    loss = VICRegLoss()
    terms = loss.terms(z0, z1)
    assert abs(terms["invariance"].item() - invariance) < 1e-12
    assert abs(terms["variance"].item() - variance) < 1e-12
    assert abs(terms["covariance"].item() - covariance) < 1e-12
    assert abs(loss(z0, z1).item() - (25 * invariance + 25 * variance + covariance)) < 1e-10
    weighted = VICRegLoss(lambda_=2.0, mu=3.0, nu=5.0)(z0, z1).item()
    assert abs(weighted - (2 * invariance + 3 * variance + 5 * covariance)) < 1e-10


def test_vicreg_terms_in_isolation():
    # Centred, mutually orthogonal columns with variance 4/3: no covariance, no variance penalty.
    decorrelated = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=DOUBLE)
    terms = VICRegLoss().terms(decorrelated, decorrelated)
    assert terms["invariance"].item() == 0.0  # identical views
    assert terms["variance"].item() == 0.0  # std = sqrt(4/3 + eps) > 1
    assert abs(terms["covariance"].item()) < 1e-15  # orthogonal columns
    assert VICRegLoss()(decorrelated, decorrelated).abs().item() < 1e-12

    shifted = decorrelated + 0.5  # only the invariance term changes: (0.5)^2 everywhere
    terms = VICRegLoss().terms(decorrelated, shifted)
    assert abs(terms["invariance"].item() - 0.25) < 1e-15 and terms["variance"].item() == 0.0

    shrunk = 0.1 * decorrelated  # only the variance term: 1 - sqrt(0.01 * 4/3 + 1e-4)
    terms = VICRegLoss().terms(shrunk, shrunk)
    assert abs(terms["variance"].item() - (1 - math.sqrt(0.01 * 4 / 3 + 1e-4))) < 1e-15
    assert terms["invariance"].item() == 0.0 and abs(terms["covariance"].item()) < 1e-15

    correlated = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 2.0], [-2.0, -2.0]], dtype=DOUBLE)
    # Cov = [[10/3, 10/3], [10/3, 10/3]]: two off-diagonal entries, /D = 2, two views.
    terms = VICRegLoss().terms(correlated, correlated)
    assert abs(terms["covariance"].item() - 2 * (2 * (10 / 3) ** 2 / 2)) < 1e-12


# ---------------------------------------------------------------------------------------------
# IntraSampleWrapper and the registry
# ---------------------------------------------------------------------------------------------


def test_wrapper_ntxent_equals_average_of_per_image_calls():
    z = random_embeddings(4, 5, 2, 6, seed=19)
    inner = NTXentLoss(0.3)
    expected = sum(inner(z[b, :, 0], z[b, :, 1]).item() for b in range(4)) / 4
    assert abs(IntraSampleWrapper(inner)(z).item() - expected) < 1e-12
    nested = [[z[:, i, 0], z[:, i, 1]] for i in range(5)]
    assert abs(IntraSampleWrapper(inner)(nested).item() - expected) < 1e-12


def test_wrapper_vicreg_and_simsiam_equal_average_of_per_image_calls():
    z = random_embeddings(3, 12, 2, 6, seed=20)
    p = random_embeddings(3, 12, 2, 6, seed=21)
    vicreg = VICRegLoss()
    expected = sum(vicreg(z[b, :, 0], z[b, :, 1]).item() for b in range(3)) / 3
    assert abs(build_loss("intrasample_vicreg")(z).item() - expected) < 1e-10
    simsiam = SimSiamLoss()
    expected = sum(simsiam(z[b, :, 0], z[b, :, 1], p[b, :, 0], p[b, :, 1]).item() for b in range(3)) / 3
    assert abs(build_loss("intrasample_simsiam")(z, p).item() - expected) < 1e-12


def test_wrapper_loops_over_images_for_other_losses():
    z = random_embeddings(3, 4, 2, 5, seed=22)

    def mean_distance(first, second):  # a plain callable, no forward_per_group
        return (first - second).norm(dim=-1).mean()

    expected = sum(mean_distance(z[b, :, 0], z[b, :, 1]).item() for b in range(3)) / 3
    assert abs(IntraSampleWrapper(mean_distance)(z).item() - expected) < 1e-12


def test_wrapper_gradients_flow():
    z = random_embeddings(2, 4, 2, 6, seed=23).requires_grad_(True)
    build_loss("intrasample_vicreg")(z).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_registry_builds_every_loss():
    assert set(LOSSES) == {
        "intrasample_ntxent",
        "ntxent",
        "simsiam",
        "vicreg",
        "intrasample_simsiam",
        "intrasample_vicreg",
    }
    for name in LOSSES:
        assert isinstance(build_loss(name), torch.nn.Module)
    assert build_loss("intrasample_ntxent", temperature=0.2).temperature == 0.2
    assert build_loss("intrasample_vicreg", mu=5.0).loss.mu == 5.0
    with pytest.raises(ValueError, match="ntxent, simsiam, vicreg"):
        build_loss("simclr")


def test_gradients_match_finite_differences():
    z = random_embeddings(2, 3, 2, 4, seed=24).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: IntraSampleNTXentLoss(0.3, variance_weight=0.2)(t), (z,))
    z0, z1 = (
        random_embeddings(3, 4, seed=25).requires_grad_(True),
        random_embeddings(3, 4, seed=26).requires_grad_(True),
    )
    assert torch.autograd.gradcheck(lambda a, b: NTXentLoss(0.3)(a, b), (z0, z1))
    assert torch.autograd.gradcheck(lambda a, b: VICRegLoss()(a, b), (z0, z1))


@pytest.mark.parametrize("name", ["intrasample_ntxent", "ntxent", "vicreg", "intrasample_vicreg"])
def test_mixed_precision_losses_are_computed_in_float32(name):
    z = random_embeddings(2, 5, 2, 16, seed=27, dtype=torch.float32)
    loss = build_loss(name)
    reference = loss(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(z)
    assert mixed.dtype == torch.float32
    assert abs(mixed.item() - reference.item()) <= 1e-6 * max(1.0, abs(reference.item()))
    assert loss(z.to(torch.bfloat16)).dtype == torch.float32
