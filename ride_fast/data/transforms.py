"""Augmentation on tensors, on whatever device the batch is on: batched ops for the in-memory
data sets; for photos, the colour jitter + normalisation of uint8 crops (`ColourMaps`,
`finish_batch`), batched on a GPU and image by image in cache on the CPU.

Shape legend: B images, K channels, H x W pixels; x is [B, K, H, W] float in [0, 1] (photo crops:
uint8 [B, H, W, K]). Random parameters are drawn from a CPU torch.Generator (reproducible,
resumable) and moved to the batch's device; the pixel work happens there.

The geometry of torchvision's photo transforms (RandomResizedCrop's window, Resize's sizes,
CenterCrop's offset) is here too, as plain functions shared by the torch loader and the tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(x: Tensor, padding: int, gen: torch.Generator) -> Tensor:
    """Zero-pad by `padding` on every side, then crop back to H x W at a random offset per image."""
    B, K, H, W = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    off = torch.randint(0, 2 * padding + 1, (2, B), generator=gen).to(x.device, non_blocking=True)
    rows = (off[0][:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (off[1][:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
    b = torch.arange(B, device=x.device)[:, None, None, None]
    k = torch.arange(K, device=x.device)[None, :, None, None]
    return padded[b, k, rows, cols]


def random_hflip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device, non_blocking=True)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_rotate(x: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """Rotate each image by a uniform angle in [-degrees, degrees] (nearest, zero fill)."""
    B = x.shape[0]
    angle = (torch.rand(B, generator=gen) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def random_resized_crop_box(width: int, height: int, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w) of the crop window.

    Ten tries of an area fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`;
    failing those, the largest center crop whose aspect ratio lies within `ratio`. `rng` is a
    numpy Generator.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_shorter_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) of torchvision's Resize(size): shorter side -> size, the longer one
    scaled and truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_offset(length: int, crop: int) -> int:
    """torchvision's CenterCrop offset: int(round((length - crop) / 2)), halves rounded to even."""
    return int(round((length - crop) / 2.0))


# Weights of the grey level (ITU-R 601 luma), as PIL's convert("L") and torchvision use.
_LUMA = (0.299, 0.587, 0.114)


def jitter_maps(batch: int, strength: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """ColorJitter(brightness=contrast=saturation=strength, hue=0) of each image as one affine map
    of its colours whose offset is affine in the image's mean colour mu:
    x -> A x + c0 + C1 mu, with x and mu in [0, 1].

    Returns A [B, 3, 3], c0 [B, 3], C1 [B, 3, 3] on the CPU. As torchvision: factors uniform in
    [1 - strength, 1 + strength], the three ops in a random order per image; each op is affine
    (brightness: f x; contrast: f x + (1 - f) mean grey of the current image; saturation:
    f x + (1 - f) grey(x)), so their composition is too, and the contrast op's mean grey level is
    affine in mu. Only torchvision's clamp to [0, 1] after each op is not reproduced (one clamp at
    the end). Keeping mu out of the draws lets a CPU batch be finished image by image: each
    image's mean is taken from the copy that is being mapped anyway.
    """
    B = batch
    f = 1 + (torch.rand(3, B, generator=gen) * 2 - 1) * strength  # [3 ops, B]
    order = torch.argsort(torch.rand(B, 3, generator=gen), dim=1)  # [B, 3 slots]
    w = torch.tensor(_LUMA)
    eye = torch.eye(3).expand(B, 3, 3)
    grey = torch.ones(3, 1) * w  # [3, 3]: every output channel = grey level
    fb, fc, fs = (f[k].view(B, 1, 1) for k in range(3))
    ops = torch.stack([fb * eye, fc * eye, fs * eye + (1 - fs) * grey])  # [3 ops, B, 3, 3]
    A, c0, C1 = eye.clone(), torch.zeros(B, 3), torch.zeros(B, 3, 3)
    rows = torch.arange(B)
    for slot in range(3):
        op = order[:, slot]
        M = ops[op, rows]  # [B, 3, 3]
        # the current image's mean grey level: w . (A mu + c0 + C1 mu) = g0 + g1 . mu
        g0, g1 = c0 @ w, w @ (A + C1)  # [B], [B, 3]
        t = torch.where(op == 1, 1 - f[1], torch.zeros(B))  # contrast: + (1 - f) mean grey, on every channel
        A = M @ A
        c0 = (M @ c0.unsqueeze(-1)).squeeze(-1) + (t * g0).unsqueeze(1)
        C1 = M @ C1 + (t.unsqueeze(1) * g1).unsqueeze(1)
    return A, c0, C1


def _periodic(v: Tensor, W: int) -> Tensor:
    """Per-channel values [..., K] repeated along an image row: [..., W * K], for element-wise ops
    on pixel-major [H, W * K] rows. Torch vectorises those; a broadcast [..., 1, K] operand
    (innermost size K = 3) runs 4-7x slower on the CPU."""
    return v.repeat(*([1] * (v.dim() - 1)), W)


class ColourMaps:
    """The per-image colour maps of a batch of H x W images: colour jitter (optional),
    normalisation and the clamp to the jittered colours' [0, 1], applied to uint8 pixels (0..255):

        y = clamp(x @ At[b] + k0[b] + K1[b] @ sum(x), lo, hi)      x, y: [HW, 3] per image b

    All random draws happen in the constructor (from `gen`, in torchvision's order), so a batch
    can be mapped image by image, in any order or thread, with the same result. Without jitter
    the map is normalisation only (one fused multiply-add, no clamp needed).
    """

    def __init__(self, batch: int, height: int, width: int, mean, std, *, jitter: float = 0.0,
                 gen: torch.Generator | None = None, device: torch.device | str = "cpu"):
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.device = torch.device(device)
        self.jitter = jitter > 0
        To = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        if self.jitter:
            A, c0, C1 = jitter_maps(batch, jitter, gen)
            # [B, 3 in, 3 out], column-major per image: MKL's fastest layout for this thin product
            self.At = To(A / (255 * s.view(1, 3, 1))).transpose(1, 2)
            self.k0 = To((c0 - m) / s)  # [B, 3]
            self.K1 = To(C1 / (255 * height * width * s.view(1, 3, 1)))  # [B, 3 out, 3 in], applied to sum(x)
            self.lo, self.hi = To(_periodic(-m / s, width)), To(_periodic((1 - m) / s, width))  # [W * 3]
            self._per_image = list(zip(self.At.unbind(0), self.k0.unbind(0), self.K1.unbind(0)))  # views, made once
        else:
            self.scale, self.shift = To(_periodic(1 / (255 * s), width)), To(_periodic(-m / s, width))

    def apply_(self, b: int, x: Tensor, out: Tensor, scratch: Tensor | None = None) -> Tensor:
        """Image b: uint8 x [H, W, 3] (any strides) -> out float [H, W, 3] (contiguous), in place.

        `scratch` (float, >= H * W * 3 elements, one per thread) holds the float copy of x: it
        stays in cache between the sum, the colour product and the bias, and no image-sized
        temporary is allocated. A 224 image is ~10 torch calls: their dispatch is a good part of
        the cost, hence the precomputed per-image views and fused ops.
        """
        H, W, _ = x.shape
        rows = out.view(H, W * 3)
        if not self.jitter:  # a float copy, then one fused multiply-add (a mixed-dtype multiply is 2x slower)
            return torch.addcmul(self.shift, rows.copy_(x.reshape(H, W * 3)), self.scale, out=rows)
        At, k0, K1 = self._per_image[b]
        xf = (scratch[:H * W * 3] if scratch is not None else torch.empty(H * W * 3, device=x.device)).view(H, W * 3)
        xf.copy_(x.reshape(H, W * 3))
        bias = torch.addmv(k0, K1, xf.sum(0).view(W, 3).sum(0))  # [3]: the sum of rows, then of pixels
        torch.mm(xf.view(H * W, 3), At, out=out.view(H * W, 3))
        return rows.add_(bias.repeat(W)).clamp_(self.lo, self.hi)

    def apply_batch(self, x: Tensor) -> Tensor:
        """uint8 x [B, H, W, 3] -> float [B, H, W, 3] in one batched chunk (for a GPU batch)."""
        B, H, W, _ = x.shape
        if not self.jitter:
            return torch.addcmul(self.shift, x.reshape(B, H, W * 3).float(), self.scale).view(B, H, W, 3)
        xf = x.reshape(B, H * W, 3).float()
        bias = self.k0 + (self.K1 @ xf.sum(1).unsqueeze(-1)).squeeze(-1)  # [B, 3]
        y = torch.baddbmm(bias.unsqueeze(1), xf, self.At)  # [B, HW, 3]
        return y.view(B, H, W * 3).clamp_(self.lo, self.hi).view(B, H, W, 3)


def channels_first(y: Tensor, channels_last: bool) -> Tensor:
    """float [B, H, W, K] pixel-major -> [B, 3, H, W] (grey repeated), channels-last memory or
    contiguous NCHW."""
    y = y.permute(0, 3, 1, 2)  # [B, K, H, W], channels-last memory
    if y.shape[1] == 1:
        y = y.expand(-1, 3, -1, -1)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def finish_batch(x: Tensor, mean, std, *, jitter: float = 0.0, gen: torch.Generator | None = None,
                 channels_last: bool = False) -> Tensor:
    """uint8 crops [B, H, W, K] (on the training device) -> float [B, 3, H, W] normalised.

    Colour jitter (when jitter > 0 and K = 3), normalisation and the final clamp are one affine map
    per image (`ColourMaps`); the result is laid out channels-last in memory (contiguous NCHW
    unless `channels_last`). Grey data sets (K = 1) are repeated to 3 channels. Shared by the DALI
    and torch photo loaders.

    On the CPU the batch goes image by image through one float scratch buffer: the float copy of a
    224 image (0.6 MB) stays in cache and no batch-sized temporary is allocated, which measured
    2-3x faster than batched ops (first touches of fresh 19 MB buffers, cache misses), with results
    equal to float rounding. On a GPU the whole batch is one chunk.
    """
    B, H, W, K = x.shape
    if K != 3:
        m, s = (torch.tensor(v, device=x.device, dtype=torch.float32) for v in (mean, std))
        return channels_first(x.float().mul_(1 / (255 * s)).sub_(m / s), channels_last)
    maps = ColourMaps(B, H, W, mean, std, jitter=jitter, gen=gen, device=x.device)
    if x.device.type != "cpu":
        return channels_first(maps.apply_batch(x), channels_last)
    y = torch.empty(B, H, W, 3)
    scratch = torch.empty(H * W * 3) if maps.jitter else None
    for b in range(B):
        maps.apply_(b, x[b], y[b], scratch)
    return channels_first(y, channels_last)
