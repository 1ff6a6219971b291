"""GBW losses over several processes (gloo on the CPU): two processes, each with one image of a batch,
get the class weights, the loss and (averaged as DDP averages them) the gradients of one process on the
whole batch, through one all-reduce per loss call and without reading a tensor back to the host."""
import os
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gbw_panoptic.gbw import GBWCrossEntropyLoss, GBWRegressionLoss, grad_norms
from gbw_panoptic.gbw.distributed import global_class_statistics
from test_gbw_losses import IGNORE, NUM_CLASSES, THING_CLASSES, _semantic_batch

WORLD_SIZE = 2

# (loss class, constructor arguments); each runs on the batch of :func:`_batch`.
CASES: List[Tuple[str, Dict]] = [
    ("ce", {}),
    ("ce", {"lam_mode": "relative", "lam": 2.0}),
    ("ce", {"mode": "class", "active_classes": THING_CLASSES, "lam_mode": "relative", "lam": 2.0}),
    ("ce", {"pixel_weights_in_norms": True, "lam_mode": "relative", "lam": 0.5}),
    ("ce", {"enabled": False}),
    ("mse", {"kind": "mse", "lam_mode": "relative", "lam": 2.0}),
    ("l1", {"kind": "l1", "active_classes": THING_CLASSES, "normalizer": "channel_weight_sum", "lam_mode": "relative"}),
    ("l1", {"kind": "l1", "normalizer": "mean", "lam_mode": "relative"}),
    ("mse", {"kind": "mse", "enabled": False}),
]


def _batch() -> Tuple[torch.Tensor, ...]:
    """Two images whose class counts differ (class 7 only in the second, more ignored pixels in the
    first): logits [2, C, 16, 16], labels [2, 16, 16], pixel weights [2, 16, 16], regression
    predictions and targets [2, 2, 16, 16]."""
    logits, labels, pixel_weights = _semantic_batch(seed=5)
    labels[1, 12:16, 8:14] = 7
    labels[0, 1:3] = IGNORE
    generator = torch.Generator().manual_seed(6)
    pred = torch.randn(2, 2, 16, 16, generator=generator)
    target = torch.randn(2, 2, 16, 16, generator=generator)
    return logits.detach(), labels, pixel_weights, pred, target


def _run_case(kind: str, kwargs: Dict, part: slice, calls: int = 2) -> Dict[str, torch.Tensor]:
    """Loss, gradient w.r.t. the network output and class weights of ``calls`` successive calls on the
    images ``part`` of :func:`_batch` (two calls exercise the EMA)."""
    logits, labels, pixel_weights, pred, target = (t[part] for t in _batch())
    if kind == "ce":
        module, output = GBWCrossEntropyLoss(NUM_CLASSES, **kwargs), logits.clone().requires_grad_()
        inputs = (output, labels, pixel_weights)
    else:
        output = pred[:, :1].clone() if kind == "mse" else pred.clone()
        output.requires_grad_()
        module = GBWRegressionLoss(NUM_CLASSES, **kwargs)
        inputs = (output, target[:, : output.shape[1]], labels, (labels != IGNORE).float() * pixel_weights)
    results = {}
    for call in range(calls):
        loss = module(*inputs)
        (grad,) = torch.autograd.grad(loss, output)
        results[f"loss{call}"], results[f"grad{call}"] = loss.detach(), grad
        results[f"weights{call}"] = module.last_weights if module.last_weights is not None else torch.zeros(0)
        statistics = getattr(module, "last_class_statistics", None) or {}
        for name, value in statistics.items():
            results[f"{name}{call}"] = value
    return results


def _worker(rank: int, rendezvous: str, output_dir: str) -> None:
    """One of :data:`WORLD_SIZE` processes: runs every case on image ``rank`` with the device path of the
    input checks and no tensor readback, counting the all-reduces; saves the results."""
    from test_gbw_no_host_sync import no_readback

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD_SIZE)
    all_reduce, reductions = dist.all_reduce, []

    def counted_all_reduce(tensor, *args, **kwargs):
        reductions.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(grad_norms, "host_checks", lambda tensor: False)
            patch.setattr(dist, "all_reduce", counted_all_reduce)
            results = []
            for kind, kwargs in CASES:
                reductions.clear()
                with no_readback():
                    result = _run_case(kind, kwargs, slice(rank, rank + 1))
                result["reductions"] = torch.tensor(reductions)
                results.append(result)
        torch.save(results, os.path.join(output_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> List[List[Dict[str, torch.Tensor]]]:
    output_dir = tmp_path_factory.mktemp("gbw_distributed")
    rendezvous = f"file://{output_dir / 'rendezvous'}"
    mp.start_processes(_worker, args=(rendezvous, str(output_dir)), nprocs=WORLD_SIZE, start_method="spawn")
    return [torch.load(output_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{kind}-{kwargs}" for kind, kwargs in CASES])
def test_two_processes_give_the_weights_loss_and_gradient_of_the_whole_batch(two_process_results, case) -> None:
    kind, kwargs = CASES[case]
    whole = _run_case(kind, kwargs, slice(0, 2))
    ranks = [results[case] for results in two_process_results]
    for call in range(2):
        for rank in ranks:
            torch.testing.assert_close(rank[f"weights{call}"], whole[f"weights{call}"], rtol=1e-5, atol=1e-6)
            # The cross-entropy's logged class statistics are those of the whole batch too.
            for name in ("sq_norm", "pixels", "ce"):
                assert (f"{name}{call}" in rank) == (f"{name}{call}" in whole)
                if f"{name}{call}" in whole:
                    torch.testing.assert_close(rank[f"{name}{call}"], whole[f"{name}{call}"], rtol=1e-5, atol=1e-7)
        # DDP averages the processes' gradients; the logged losses are averaged likewise.
        mean_loss = torch.stack([rank[f"loss{call}"] for rank in ranks]).mean()
        torch.testing.assert_close(mean_loss, whole[f"loss{call}"], rtol=1e-5, atol=1e-7)
        grads = torch.cat([rank[f"grad{call}"] for rank in ranks]) / WORLD_SIZE
        torch.testing.assert_close(grads, whole[f"grad{call}"], rtol=1e-5, atol=1e-8)
    # One all-reduce per call: the statistics ([C] or [C, C] norms, [C] counts, the cross-entropy's [C]
    # class loss sums, the weight sum) or,
    # with GBW off, the regression weight sum alone; nothing for a mean over the pixels.
    reductions = ranks[0]["reductions"].tolist()
    enabled = kwargs.get("enabled", True)
    if not enabled:
        per_call = [1] if kind != "ce" else []
    else:
        channel_mode = kind == "ce" and kwargs.get("mode", "channel") == "channel"
        norms = NUM_CLASSES * NUM_CLASSES if channel_mode else NUM_CLASSES
        weight_sum = 0 if kind == "ce" or kwargs.get("normalizer") == "mean" else 1
        class_losses = NUM_CLASSES if kind == "ce" else 0
        per_call = [norms + NUM_CLASSES + class_losses + weight_sum]
    assert reductions == per_call * 2


def test_the_weights_differ_when_each_process_solves_on_its_own_image() -> None:
    """The reduction matters: the weights of one image are not those of the whole batch."""
    kind, kwargs = CASES[1]
    whole = _run_case(kind, kwargs, slice(0, 2), calls=1)["weights0"]
    alone = _run_case(kind, kwargs, slice(1, 2), calls=1)["weights0"]
    assert (alone - whole).abs().max() > 0.01


def test_global_class_statistics_in_one_process_group_returns_the_local_norms(tmp_path) -> None:
    """With a world of one the helper's unnormalise / normalise round trip gives the norms back."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        counts = torch.tensor([0.0, 3.0, 1000.0])
        sq_norms = torch.tensor([0.0, 0.25, 1e-6])
        matrix = torch.rand(3, 3)
        reduced_norms, reduced_counts, total = global_class_statistics(sq_norms, counts, torch.tensor(5.0))
        torch.testing.assert_close(reduced_norms, sq_norms)
        assert torch.equal(reduced_counts, counts) and total.item() == 5.0
        torch.testing.assert_close(global_class_statistics(matrix, counts)[0], matrix.sum(dim=0))
    finally:
        dist.destroy_process_group()
