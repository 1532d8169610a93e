"""Transforms: torchvision's geometry, the batched colour jitter and normalisation (photos); random
crop, flip and rotation keep the content (in-memory data sets)."""
import math

import numpy as np
import pytest
import torch

from ride_fast.data.transforms import (
    center_crop_offset,
    finish_batch,
    jitter_maps,
    random_crop,
    random_hflip,
    random_resized_crop_box,
    random_rotate,
    resize_shorter_size,
)

LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def test_resize_and_center_crop_follow_torchvision():
    assert resize_shorter_size(500, 375, 256) == (341, 256)
    assert resize_shorter_size(221, 333, 256) == (256, 385)  # int(256 * 333 / 221) = 385 (truncated)
    assert resize_shorter_size(300, 300, 256) == (256, 256)
    assert center_crop_offset(341, 224) == 58  # round(58.5) = 58: halves to even
    assert center_crop_offset(343, 224) == 60  # round(59.5) = 60
    assert center_crop_offset(256, 224) == 16


def test_random_resized_crop_windows():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_box(500, 375, rng)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500 and h > 0 and w > 0
        areas.append(h * w / (500 * 375))
        ratios.append(w / h)
    assert 0.07 < min(areas) and max(areas) <= 1.0 and 0.4 < np.mean(areas) < 0.6
    assert min(ratios) > 0.74 and max(ratios) < 1.34
    # a very wide image: no try fits, the fallback is the widest allowed center crop
    assert random_resized_crop_box(1000, 10, rng, scale=(0.99, 1.0), ratio=(1.0, 1.0)) == (0, 495, 10, 10)


def _sequential_jitter(x, f, order):
    """torchvision's ColorJitter(b, c, s) op by op (without its intermediate clamps)."""
    out = []
    for i in range(x.shape[0]):
        y = x[i : i + 1]
        for op in order[i].tolist():
            grey = (y * LUMA).sum(1, keepdim=True)
            if op == 0:
                y = f[0, i] * y
            elif op == 1:
                y = f[1, i] * y + (1 - f[1, i]) * grey.mean()
            else:
                y = f[2, i] * y + (1 - f[2, i]) * grey
        out.append(y)
    return torch.cat(out)


def test_jitter_as_one_affine_map_equals_the_ops_in_sequence():
    x = torch.rand(7, 3, 9, 11) * 0.8 + 0.1
    A, c0, C1 = jitter_maps(7, 0.4, torch.Generator().manual_seed(3))
    c = c0 + (C1 @ x.mean((2, 3)).unsqueeze(-1)).squeeze(-1)  # the offset for each image's mean colour
    gen = torch.Generator().manual_seed(3)  # the same draws, in the same order
    f = 1 + (torch.rand(3, 7, generator=gen) * 2 - 1) * 0.4
    order = torch.argsort(torch.rand(7, 3, generator=gen), dim=1)
    assert len({tuple(o) for o in order.tolist()}) > 1  # the order differs between images
    assert ((f >= 0.6) & (f <= 1.4)).all()
    got = torch.einsum("bij,bjhw->bihw", A, x) + c[:, :, None, None]
    torch.testing.assert_close(got, _sequential_jitter(x, f, order), atol=1e-5, rtol=1e-5)


def test_finish_batch_normalises_and_lays_out_channels_last():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 6, 5, 3), dtype=torch.uint8, generator=g)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    y = finish_batch(x, mean, std, channels_last=True)
    ref = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert y.shape == (4, 3, 6, 5) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert finish_batch(x, mean, std).is_contiguous()
    grey = finish_batch(x[..., :1], (0.5,), (0.25,))
    assert grey.shape == (4, 3, 6, 5) and torch.equal(grey[:, 0], grey[:, 2])
    # jitter keeps the colours in range (clamped) and changes them
    j = finish_batch(x, mean, std, jitter=0.4, gen=torch.Generator().manual_seed(1))
    lo = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1)
    assert ((j >= lo - 1e-5) & (j <= hi + 1e-5)).all() and not torch.allclose(j, ref)
    assert math.isfinite(j.sum().item())


def test_jittered_batch_is_the_unjittered_batch_through_the_drawn_colour_maps():
    """finish_batch with jitter = finish_batch without, un-normalised, through each image's drawn
    map u -> clamp(A u + c0 + C1 mean(u), 0, 1), normalised again; the maps differ per image."""
    x = torch.randint(0, 256, (6, 10, 9, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor((0.5, 0.4, 0.3)), torch.tensor((0.2, 0.25, 0.3))
    m, s = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
    plain = finish_batch(x, tuple(mean.tolist()), tuple(std.tolist()))
    jittered = finish_batch(x, tuple(mean.tolist()), tuple(std.tolist()), jitter=0.4, gen=torch.Generator().manual_seed(4))
    A, c0, C1 = jitter_maps(6, 0.4, torch.Generator().manual_seed(4))  # the draws finish_batch made
    assert not torch.allclose(A, torch.eye(3).expand(6, 3, 3), atol=0.05)  # not the identity
    assert not torch.allclose(A[0], A[1], atol=1e-3)  # one map per image
    u = plain * s + m  # [B, 3, H, W] in [0, 1]
    c = c0 + (C1 @ u.mean((2, 3)).unsqueeze(-1)).squeeze(-1)
    want = (torch.einsum("bij,bjhw->bihw", A, u) + c[:, :, None, None]).clamp(0, 1)
    torch.testing.assert_close(jittered, (want - m) / s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_colour_maps_batched_equal_image_by_image(jitter):
    """The batched form (a GPU batch) and the per-image form (the CPU loaders) of the same draws
    agree; the colour maps do not depend on the order images are mapped in."""
    from ride_fast.data.transforms import ColourMaps

    x = torch.randint(0, 256, (5, 12, 10, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    maps = ColourMaps(5, 12, 10, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), jitter=jitter, gen=torch.Generator().manual_seed(1))
    batched = maps.apply_batch(x)
    one = torch.empty(5, 12, 10, 3)
    for b in reversed(range(5)):
        maps.apply_(b, x[b], one[b], torch.empty(12 * 10 * 3))
    torch.testing.assert_close(one, batched, atol=1e-5, rtol=1e-5)


def _offsets(crop: torch.Tensor, x: torch.Tensor, pad: int) -> list[tuple[int, int]]:
    """The (row, col) window of the zero-padded x that each crop is; random images make it unique."""
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    H, W = x.shape[-2:]
    out = []
    for i in range(x.shape[0]):
        found = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)
                 if torch.equal(crop[i], padded[i, :, r : r + H, c : c + W])]
        assert len(found) == 1, f"image {i}: the crop is no window of the padded image ({found})"
        out.append(found[0])
    return out


def test_random_crop_shifts_by_offsets_that_vary_over_a_seeded_batch():
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    crop = random_crop(x, 4, torch.Generator().manual_seed(0))
    assert crop.shape == x.shape
    offsets = _offsets(crop, x, 4)
    rows, cols = {r for r, _ in offsets}, {c for _, c in offsets}
    assert len(set(offsets)) >= 8 and min(rows) < 4 < max(rows) and min(cols) < 4 < max(cols), offsets  # not one shift
    assert torch.equal(random_crop(x, 4, torch.Generator().manual_seed(0)), crop)  # seeded: reproducible


def test_random_hflip_mirrors_some_images_of_a_seeded_batch_and_keeps_the_others():
    x = torch.rand(16, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    flipped = random_hflip(x, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(flipped[i], x[i]) for i in range(16)]
    assert all(m != k for m, k in zip(mirrored, kept))  # each image one or the other
    assert 4 <= sum(mirrored) <= 12, mirrored  # probability 1/2 each


def _rotate_reference(img: torch.Tensor, angle: float) -> torch.Tensor:
    """img [K, H, W] rotated by `angle` radians about its centre: affine_grid's sampling grid of the
    rotation, nearest pixel, zeros outside."""
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]])
    grid = torch.nn.functional.affine_grid(theta, [1, *img.shape], align_corners=False)
    return torch.nn.functional.grid_sample(img[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]


def test_rotation_matches_the_affine_grid_reference_at_the_drawn_angle():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    # the reference itself: a quarter turn of a square image is a permutation of its pixels
    torch.testing.assert_close(_rotate_reference(x[0], math.pi / 2), torch.rot90(x[0], 1, (1, 2)))
    assert torch.equal(random_rotate(x, 0.0, torch.Generator().manual_seed(0)), x)
    rot = random_rotate(x, 15.0, torch.Generator().manual_seed(0))
    angles = (torch.rand(8, generator=torch.Generator().manual_seed(0)) * 2 - 1) * math.radians(15.0)  # the draws
    assert angles.abs().max() > math.radians(10) and (angles > 0).any() and (angles < 0).any()  # spread
    for i in range(8):
        if abs(angles[i]) > math.radians(3):
            assert not torch.equal(rot[i], x[i])
        torch.testing.assert_close(rot[i], _rotate_reference(x[i], float(angles[i])), rtol=0, atol=0)
    # the sign: a positive angle is not its mirror
    i = int(angles.abs().argmax())
    assert not torch.equal(rot[i], _rotate_reference(x[i], -float(angles[i])))
