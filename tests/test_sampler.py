"""The epoch order of the training loop: every training image once (shuffled), or group-balanced draws (upsampled,
vl-erm, vl-gdro)."""

from __future__ import annotations

import torch

from ravl_engine.training import balanced_sampler, shuffle_sampler


def _order(groups: torch.Tensor, train_idx: torch.Tensor, balanced: bool, seed: int) -> torch.Tensor:
    """The one place these tests call the samplers (the loop's epoch order over a set with these groups)."""
    sampler = balanced_sampler(groups) if balanced else shuffle_sampler
    return sampler(train_idx, torch.Generator().manual_seed(seed))


def _groups() -> tuple[torch.Tensor, torch.Tensor]:
    """300 images in 4 groups of very different sizes (200, 60, 30, 10); the training split is every other one
    but with group 3 whole, so the sampler must index groups through the training indices."""
    groups = torch.cat([torch.full((200,), 0), torch.full((60,), 1), torch.full((30,), 2), torch.full((10,), 3)])
    train_idx = torch.cat([torch.arange(0, 290, 2), torch.arange(290, 300)])
    return groups, train_idx


def test_unbalanced_order_is_a_permutation_of_the_training_images():
    groups, train_idx = _groups()
    order = _order(groups, train_idx, False, seed=0)
    assert sorted(order.tolist()) == sorted(train_idx.tolist())
    assert order.tolist() != train_idx.tolist()  # shuffled (a 155-element permutation equal to identity: 1/155!)


def test_balanced_draws_give_every_group_the_same_share():
    groups, train_idx = _groups()
    n_groups = int(groups.max()) + 1
    counts = torch.zeros(n_groups, dtype=torch.float64)
    draws = 200
    for seed in range(draws):
        order = _order(groups, train_idx, True, seed=seed)
        assert order.numel() == train_idx.numel()  # an epoch is as long as the training set
        assert set(order.tolist()) <= set(train_idx.tolist())  # only training images are drawn
        counts += torch.bincount(groups[order], minlength=n_groups).double()
    share = counts / counts.sum()
    # 200 x 155 draws: the standard error of a 1/4 share is about 0.0025; 0.02 is eight of them
    assert torch.all((share - 1 / n_groups).abs() < 0.02), share.tolist()
    # unbalanced, the shares are the training split's: group 0 holds 100 of 155 images
    plain = torch.bincount(groups[_order(groups, train_idx, False, seed=0)], minlength=n_groups)
    assert plain.tolist() == torch.bincount(groups[train_idx], minlength=n_groups).tolist() == [100, 30, 15, 10]


def test_balanced_draws_are_reproducible_from_the_seed():
    groups, train_idx = _groups()
    assert torch.equal(_order(groups, train_idx, True, seed=5), _order(groups, train_idx, True, seed=5))
    assert not torch.equal(_order(groups, train_idx, True, seed=5), _order(groups, train_idx, True, seed=6))
