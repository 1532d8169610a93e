"""Samplers: sharding covers every sample exactly once, reshuffles per epoch, class balance."""
import numpy as np
import pytest
import torch

from ride_fast.data import ArrayDataset, ClassBalancedSampler, InMemoryLoader, ShuffleSampler
from ride_fast.data.samplers import batch_indices, num_batches


@pytest.mark.parametrize("n", [0, 1, 7, 12, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_shards_cover_every_sample_exactly_once(n, world):
    shards = [ShuffleSampler(n, shuffle=False, rank=r, world_size=world) for r in range(world)]
    got = np.concatenate([s.indices() for s in shards]) if n else np.array([], dtype=np.int64)
    assert sorted(got.tolist()) == list(range(n))
    assert [len(s) for s in shards] == [len(s.indices()) for s in shards]
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_training_shards_are_equal_disjoint_and_reshuffled(world):
    n = 23
    shards = [ShuffleSampler(n, seed=7, rank=r, world_size=world) for r in range(world)]
    for s in shards:
        s.set_epoch(4)
    parts = [s.indices() for s in shards]
    assert len({len(p) for p in parts}) == 1 and all(len(p) == len(s) == -(-n // world) for p, s in zip(parts, shards))
    flat = np.concatenate(parts)
    assert set(flat.tolist()) == set(range(n))  # all covered; padding repeats at most world - 1 images
    assert len(flat) - n == (-n) % world
    again = ShuffleSampler(n, seed=7, rank=0, world_size=world)
    again.set_epoch(4)
    assert np.array_equal(again.indices(), parts[0])  # (seed, epoch) decide the order
    again.set_epoch(5)
    assert not np.array_equal(again.indices(), parts[0]) or world == n


def test_class_balanced_sampler_draws_classes_uniformly():
    labels = np.repeat(np.arange(4), [200, 30, 5, 1])  # long-tailed
    s = ClassBalancedSampler(labels, 4, seed=0)
    assert len(s) == len(labels)
    draws = np.concatenate([(s.set_epoch(e), s.indices())[1] for e in range(20)])
    freq = np.bincount(labels[draws], minlength=4) / len(draws)
    assert np.allclose(freq, 0.25, atol=0.02)
    # within a class, images come in shuffled rounds: no repeat before the whole class was seen
    s.set_epoch(0)
    seq = s.indices()
    first = seq[labels[seq] == 1]
    assert len(set(first[:30].tolist())) == 30 and sorted(first[:30].tolist()) == list(range(200, 230))


def test_class_balanced_sampler_is_deterministic_and_sharded():
    labels = torch.tensor([0] * 50 + [1] * 7 + [3] * 2)  # class 2 has no image: never drawn
    world = 3
    shards = [ClassBalancedSampler(labels, 4, seed=5, rank=r, world_size=world) for r in range(world)]
    for sh in shards:
        sh.set_epoch(2)
    whole = shards[0].global_indices()
    for r, sh in enumerate(shards):
        assert np.array_equal(sh.indices(), whole[r::world]) and len(sh) == 20
    assert set(labels[whole].tolist()) == {0, 1, 3}
    other = ClassBalancedSampler(labels, 4, seed=5)
    other.set_epoch(3)
    assert not np.array_equal(other.global_indices()[:20], whole[:20])
    with pytest.raises(ValueError, match="out of range for 3 classes"):
        ClassBalancedSampler(labels, 3)
    with pytest.raises(ValueError, match="rank must lie in"):
        ClassBalancedSampler(labels, 4, rank=3, world_size=3)


def test_batches_and_their_count_agree():
    for n in range(0, 20):
        for bs in (1, 3, 4, 8):
            for drop in (False, True):
                b = batch_indices(np.arange(n), bs, drop_single=drop)
                assert len(b) == num_batches(n, bs, drop_single=drop)
                if drop and n > 1:
                    assert all(len(x) > 1 for x in b) or bs == 1


def test_in_memory_loader_shards_evaluation_and_balances_training():
    ds = ArrayDataset(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous(),
                      torch.tensor([0] * 7 + [1] * 2 + [2]), 3, (0.0,), (1.0,))
    seen = []
    for r in range(3):
        loader = InMemoryLoader(ds, 2, train=False, sampler=ShuffleSampler(10, shuffle=False, rank=r, world_size=3))
        seen += [int(round(v * 255)) for b in loader for v in b.images[:, 0, 0, 0].tolist()]
    assert sorted(seen) == list(range(10))
    loader = InMemoryLoader(ds, 5, train=True, augment=False, sampler=ClassBalancedSampler(ds.labels, 3, seed=1))
    loader.set_epoch(1)
    labels = torch.cat([b.labels for b in loader])
    assert len(labels) == 10 and len(loader) == 2 and set(labels.tolist()) <= {0, 1, 2}
