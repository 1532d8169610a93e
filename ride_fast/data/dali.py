"""NVIDIA DALI loaders: JPEG decoding and augmentation in DALI's C++ thread pool (CPU pipelines,
`device_id=None`) or on the GPU (`device="mixed"` decoding, nvJPEG), and CIFAR-size arrays fed
from memory. DALI is imported only inside these functions: `import ride_fast.data` never needs it.

Shape legend: B images per batch (per rank), S crop size (224), R resize size (256), H x W image.

Photos (`image_pipeline`), uint8 HWC through the graph:
  training:   decode the random crop only (ROI decoding; area 0.08-1, aspect 3/4-4/3, 10 tries),
              then resize to S x S (linear, antialiased) and mirror with p = 1/2;
  evaluation: decode, resize the shorter side to R with the longer one truncated (torchvision's
              sizes, computed in the graph from the JPEG header), center crop S with torchvision's
              rounding. It matches the torch loader's PIL path within one grey level.
On a GPU all of it runs in the graph. A CPU pipeline stops after decoding (see below).
The loader then holds uint8 [B, S, S, 3]; colour jitter (where the recipe has it) and normalisation
run batched on the training device in `transforms.finish_batch`, the same code as the torch
loader's, giving float [B, 3, S, S] in channels-last memory. Measured on the CPU, DALI's colour
twist + normalisation cost more than the whole ROI decode, and a uint8 copy to the GPU moves 4x
fewer bytes than float.

CPU pipelines (`finish_crops`): DALI's CPU resize (separable float resampling) cost more than the
decoding, so the crops (training) or whole images (evaluation) leave the graph at their own sizes
and a small thread pool resizes them with torch's uint8 antialiased kernel (about 5x cheaper),
mirrors or center-crops them and applies the same colour maps as `finish_batch`, image by image
straight into the float batch; torch releases the GIL in its kernels, so the pool runs beside
DALI's decoding of the next batches. For a GPU training device fed by a CPU pipeline,
`resize_crops` gives the uint8 batch and the GPU finishes it.

Differences from torchvision kept on purpose (augmentation statistics, not evaluation): DALI's own
random numbers and crop sampler, and nvJPEG's plain (not "fancy") chroma upsampling in GPU
training (a profile of the CPU decoder shows libjpeg-turbo's fancy upsampling, as PIL's). A CPU
pipeline draws its mirror flips from the loader's torch generator, seeded from (seed, epoch, rank)
as the jitter draws are.

Order and sharding come from our samplers (seeded, reshuffled by `set_epoch`, split over ranks):
each epoch feeds DALI the rank's index batches through `fn.external_source`, so the last partial
batch is just smaller (no padding, no duplicates) and labels never pass through DALI. A fresh
pipeline is built per epoch with a seed from (seed, epoch, rank), so a resumed run replays it.
"""
from __future__ import annotations

import importlib.util
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F

from ride_fast.data.dataset import ArrayDataset, Batch
from ride_fast.data.image_list import ImageListDataset, ImageRecipe
from ride_fast.data.loader import EpochLoader, cpus_per_rank
from ride_fast.data.samplers import batch_indices, epoch_rng
from ride_fast.data.transforms import ColourMaps, center_crop_offset, channels_first, finish_batch, resize_shorter_size
from ride_fast.data.verify import decode_problem

DALI_PACKAGE = "nvidia-dali-cuda130==2.4.0"


def dali_available() -> bool:
    """True when NVIDIA DALI is installed (found without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def _dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
    except ImportError as err:
        raise ImportError(f"data.loader=dali needs NVIDIA DALI ({err}): pip install --no-deps -r requirements.txt "
                          f"(it pins {DALI_PACKAGE}), or set data.loader=torch") from None
    return dali, fn, types, dmath


def _threads(num_workers: int) -> int:
    return cpus_per_rank() if num_workers < 0 else max(1, num_workers)


def _pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    return int(epoch_rng(seed, epoch, 4, rank).integers(2**31 - 1))


def stored_shape(encoded):
    """[H, W, C] of encoded images as stored, read from their headers: without the EXIF rotation
    (DALI's default here), so that it is the shape the decoders below give (adjust_orientation=False)."""
    _, fn, types, _ = _dali()
    return fn.peek_image_shape(encoded, dtype=types.INT32, adjust_orientation=False)


def image_pipeline(source, recipe: ImageRecipe, *, train: bool, batch_size: int, num_threads: int,
                   device_id: int | None, seed: int, prefetch: int = 2):
    """The DALI pipeline for encoded photos fed by `source()` (a list of uint8 byte arrays per call).

    device_id=None: everything on the CPU; else decoding is "mixed" (nvJPEG) and the rest runs on
    that GPU. Returns an unbuilt Pipeline whose single output is uint8 [B, S, S, 3] on a GPU; a
    CPU pipeline outputs uint8 [h, w, 3] images of their own sizes (the random crops in training,
    the whole images in evaluation), which `finish_crops` / `resize_crops` bring to S x S.
    """
    dali, fn, types, dmath = _dali()
    S, R = recipe.crop_size, recipe.resize_size
    decoder = "cpu" if device_id is None else "mixed"

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                       prefetch_queue_depth=prefetch)
    def photos():
        encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8, name="encoded")
        if train:
            images = fn.decoders.image_random_crop(
                encoded, device=decoder, output_type=types.RGB, random_area=list(recipe.scale),
                random_aspect_ratio=list(recipe.ratio), num_attempts=10, adjust_orientation=False)
            if device_id is None:
                return images  # ragged crops: `resize_crops` finishes them (see the module docstring)
            images = fn.resize(images, size=[S, S], interp_type=types.INTERP_LINEAR, antialias=True)
            if recipe.flip:
                images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        else:
            # PIL's decoder (libjpeg with fancy upsampling) and no EXIF rotation, as torchvision.
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True,
                                       adjust_orientation=False)
            if device_id is None:
                return images  # whole images: `resize_crops` resizes and center-crops them
            shape = stored_shape(encoded)
            h, w = shape[0], shape[1]
            short = dmath.min(h, w)
            nh, nw = (h * R) // short, (w * R) // short  # torchvision: int(R * long / short)
            images = fn.resize(images, resize_x=fn.cast(nw, dtype=types.FLOAT), resize_y=fn.cast(nh, dtype=types.FLOAT),
                               interp_type=types.INTERP_LINEAR, antialias=True)

            def half_to_even(d):  # int(round(d / 2)) with Python's rounding of halves to even
                k = d // 2
                return k + (d - 2 * k) * (k - 2 * (k // 2))

            start = fn.stack(half_to_even(nh - S), half_to_even(nw - S))
            images = fn.slice(images, start=start, shape=fn.constant(idata=[S, S]), axes=[0, 1])
        return images

    return photos()


def _sample(crops, i: int) -> torch.Tensor:
    """Sample i of a TensorListCPU as a uint8 tensor on DALI's buffer (no copy; numpy's array
    interface costs a third of DLPack's per call)."""
    return torch.from_numpy(np.asarray(crops[i]))


def _resize_one(hwc: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [h, w, 3] (DALI's buffer, read in place) -> uint8 [height, width, 3], antialiased
    bilinear (PIL's BILINEAR, as the torch loader).

    The image goes in as a channels-last [1, 3, h, w] whose batch stride is h * w * 3: with that
    stride torch recognises the layout and writes a channels-last (HWC) result; with the stride
    `unsqueeze` gives, it writes planar NCHW and the kernel takes about twice as long.
    """
    h, w, k = hwc.shape
    image = hwc.as_strided((1, k, h, w), (h * w * k, 1, w * k, k))  # the same memory as [1, 3, h, w] channels-last
    y = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0)  # [height, width, 3], contiguous


def _fit(hwc: torch.Tensor, size: int, shorter: int | None) -> torch.Tensor:
    """One decoded image -> uint8 [S, S, 3]: a training crop resized to S x S (shorter=None), or
    an evaluation image resized to `shorter` on its shorter side (torchvision's sizes) and
    center-cropped to S (a view)."""
    if shorter is None:
        return _resize_one(hwc, size, size)
    h, w, _ = hwc.shape
    nw, nh = resize_shorter_size(w, h, shorter)
    top, left = center_crop_offset(nh, size), center_crop_offset(nw, size)
    return _resize_one(hwc, nh, nw)[top:top + size, left:left + size]


def _mirrors(n: int, flip: bool, gen: torch.Generator) -> list[bool]:
    """Which of n images to mirror (p = 1/2 each, drawn from `gen` before any colour draw); all
    False without `flip`. `resize_crops` and `finish_crops` draw through here, so the two paths
    give the same batch for the same generator."""
    return (torch.rand(n, generator=gen) < 0.5).tolist() if flip else [False] * n


def resize_crops(crops, size: int, *, flip: bool, gen: torch.Generator, shorter: int | None = None,
                 pin_memory: bool = False) -> torch.Tensor:
    """The ragged uint8 HWC images of a CPU pipeline (a TensorListCPU) -> uint8 [B, S, S, 3]:
    training crops resized to S x S with antialiased bilinear filtering (PIL's BILINEAR, as the
    torch loader) and mirrored with p = 1/2 (draws from `gen`); with `shorter` (evaluation), each
    image resized to that shorter side and center-cropped. For a GPU training device: the uint8
    batch is copied over and finished there. Samples are read in place (`_sample`), so `crops`
    must stay alive (the pipeline not run again) until this returns.

    torch's uint8 antialiased kernel (AVX2) takes about 0.2 ms per 224 crop against 1.5 ms for
    DALI's CPU `fn.resize` (which resamples in float), the largest cost of the DALI CPU pipeline.
    """
    n = len(crops)
    out = torch.empty((n, size, size, 3), dtype=torch.uint8, pin_memory=pin_memory)
    mirror = _mirrors(n, flip, gen)
    for i in range(n):
        y = _fit(_sample(crops, i), size, shorter)
        out[i].copy_(y.flip(1) if mirror[i] else y)
    return out


def finish_crops(crops, size: int, mean, std, *, flip: bool, jitter: float, gen: torch.Generator,
                 shorter: int | None = None, channels_last: bool = False, pool=None, threads: int = 1) -> torch.Tensor:
    """The ragged uint8 HWC images of a CPU pipeline -> the finished float batch [B, 3, S, S] on
    the CPU: `resize_crops` then `transforms.finish_batch` (the same draws from `gen`, the same
    result to float rounding), fused image by image.

    Each crop is resized, mirrored, colour-mapped and normalised while its 224 x 224 copies are in
    cache, straight into the output batch: no uint8 batch, no second pass over it. With `pool` (a
    concurrent.futures executor of `threads` threads) the batch is split into one contiguous span
    per thread; torch releases the GIL inside its kernels, so the spans run in parallel with each
    other and with DALI's decoding of the next batches. `crops` must stay alive until this returns.
    """
    n = len(crops)
    mirror = _mirrors(n, flip, gen)
    maps = ColourMaps(n, size, size, mean, std, jitter=jitter, gen=gen)
    y = torch.empty(n, size, size, 3)

    def span(lo: int, hi: int) -> None:
        scratch = torch.empty(size * size * 3) if maps.jitter else None
        for i in range(lo, hi):
            x = _fit(_sample(crops, i), size, shorter)
            maps.apply_(i, x.flip(1) if mirror[i] else x, y[i], scratch)

    parts = threads if pool is not None else 1
    if parts <= 1:
        span(0, n)
    else:
        bounds = [n * p // parts for p in range(parts + 1)]
        for done in [pool.submit(span, lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]:
            done.result()
    return channels_first(y, channels_last)


def array_pipeline(source, dataset: ArrayDataset, *, train: bool, batch_size: int, num_threads: int,
                   device_id: int | None, seed: int, padding: int = 4, prefetch: int = 2):
    """The DALI pipeline for CIFAR-size uint8 HWC arrays fed from memory: random crop with zero
    padding, mirror, rotation (nearest, zero fill) where the data set has it; uint8 out."""
    dali, fn, types, _ = _dali()
    H, W = int(dataset.images.shape[2]), int(dataset.images.shape[3])

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                       prefetch_queue_depth=prefetch)
    def arrays():
        images = fn.external_source(source=source, batch=True, dtype=types.UINT8, layout="HWC", name="arrays")
        if device_id is not None:
            images = images.gpu()
        if train:
            shift = fn.random.uniform(values=[float(v) for v in range(-padding, padding + 1)], shape=[2])
            images = fn.slice(images, start=fn.cast(shift, dtype=types.INT32), shape=fn.constant(idata=[H, W]), axes=[0, 1],
                              out_of_bounds_policy="pad", fill_values=0)
            if dataset.flip:
                images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
            if dataset.rotate:
                images = fn.rotate(images, angle=fn.random.uniform(range=[-dataset.rotate, dataset.rotate]), keep_size=True,
                                   fill_value=0, interp_type=types.INTERP_NN)
        return images

    return arrays()


class _DaliLoaderBase(EpochLoader):
    """Epoch bookkeeping shared by the DALI loaders: batches of sampler indices are fed one by one
    to a fresh pipeline, and each output is paired with the indices that went in (DALI keeps order).
    Not seekable: the pipeline draws its crops from its own generator (seeded per epoch)."""

    seekable = False

    def __init__(self, dataset, batch_size: int, *, train: bool, device="cpu", channels_last: bool = False,
                 seed: int = 0, sampler=None, num_workers: int = -1, augment: bool = True):
        super().__init__(dataset, batch_size, train=train, device=device, augment=augment, channels_last=channels_last,
                         seed=seed, sampler=sampler)
        self.num_threads = _threads(num_workers)
        self.finish_threads = self.num_threads  # CPU training: threads that resize + normalise the crops
        self._executor = None
        _dali()  # fail now, with the hint, if DALI is missing

    # subclasses: _feed(indices) -> list of arrays; _build(source) -> pipeline; _explain(err, indices)
    def __iter__(self):
        batches = deque(batch_indices(self.sampler.indices(), self.batch_size, drop_single=self.train))
        if not batches:
            return
        inflight: deque = deque()

        def source():
            if not batches:
                raise StopIteration
            idx = batches.popleft()
            inflight.append(idx)
            return self._feed(idx)

        device_id = self._device_id()
        pipe = self._build(source, device_id, _pipeline_seed(self.seed, self.epoch, self.rank))
        pipe.build()
        from nvidia.dali.plugin.pytorch import feed_ndarray

        ds = self.dataset
        jitter = self._jitter()
        geometry = self._geometry()
        gen = torch.Generator().manual_seed(int(epoch_rng(self.seed, self.epoch, 3, self.rank).integers(2**62)))
        while True:
            try:
                (out,) = pipe.run()
            except StopIteration:
                break
            except RuntimeError as err:
                self._explain(err, list(inflight))
                raise
            idx = inflight.popleft()
            if self._ragged(device_id) and self.device.type == "cpu":  # a CPU pipeline: images finished here
                x = finish_crops(out, ds.recipe.crop_size, ds.mean, ds.std, **geometry, jitter=jitter, gen=gen,
                                 channels_last=self.channels_last, pool=self._pool(), threads=self.finish_threads)
            else:
                if self._ragged(device_id):  # a CPU pipeline for a GPU: images resized here, finished there
                    x = resize_crops(out, ds.recipe.crop_size, **geometry, gen=gen, pin_memory=True)
                    x = x.to(self.device, non_blocking=True)
                elif device_id is not None:  # a GPU pipeline: copy on torch's stream
                    images = out.as_tensor()
                    x = torch.empty(tuple(images.shape()), dtype=torch.uint8, device=self.device)  # [B, S, S, K]
                    feed_ndarray(images, x, cuda_stream=torch.cuda.current_stream(self.device))
                else:
                    images = out.as_tensor()
                    x = torch.empty(tuple(images.shape()), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
                    feed_ndarray(images, x)
                    x = x.to(self.device, non_blocking=True)
                x = finish_batch(x, ds.mean, ds.std, jitter=jitter, gen=gen, channels_last=self.channels_last)
            yield Batch(images=x, labels=ds.labels.index_select(0, torch.from_numpy(idx)).to(self.device, non_blocking=True))
        del pipe

    def _pool(self):
        """The threads that finish CPU training batches (None: the calling thread alone)."""
        if self.finish_threads < 2:
            return None
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(self.finish_threads, thread_name_prefix="ride_fast-finish")
        return self._executor

    def _device_id(self) -> int | None:
        """The GPU the pipeline runs on, or None for a CPU pipeline."""
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _jitter(self) -> float:
        return 0.0

    def _ragged(self, device_id: int | None) -> bool:
        """Whether the pipeline outputs images of many sizes, for `finish_crops` / `resize_crops`."""
        return False

    def _geometry(self) -> dict:
        """How `finish_crops` / `resize_crops` bring a ragged image to S x S (their keywords)."""
        return {}

    def _explain(self, err: Exception, inflight: list) -> None:
        pass


class DaliImageLoader(_DaliLoaderBase):
    """Batches of `Batch(images [B, 3, S, S] float normalised, labels [B])` from an ImageListDataset,
    decoded and augmented by DALI (on the GPU when `device` is CUDA and `decode_on_gpu`)."""

    def __init__(self, dataset: ImageListDataset, batch_size: int, *, decode_on_gpu: bool = True, **kw):
        super().__init__(dataset, batch_size, **kw)
        self.decode_on_gpu = decode_on_gpu

    def _feed(self, idx: np.ndarray) -> list[np.ndarray]:
        files = self.dataset.files
        out = []
        for i in idx.tolist():
            try:
                out.append(np.fromfile(files[i], dtype=np.uint8))
            except OSError as err:
                raise FileNotFoundError(f"{self.dataset.where(int(i))}: cannot read {files[i]} ({err.strerror or err})") from None
        return out

    def _device_id(self) -> int | None:
        return super()._device_id() if self.decode_on_gpu else None

    def _build(self, source, device_id, seed):
        return image_pipeline(source, self.dataset.recipe, train=self.augment, batch_size=self.batch_size,
                              num_threads=self.num_threads, device_id=device_id, seed=seed)

    def _jitter(self) -> float:
        return self.dataset.recipe.jitter if self.augment else 0.0

    def _ragged(self, device_id: int | None) -> bool:
        return device_id is None

    def _geometry(self) -> dict:
        recipe = self.dataset.recipe
        if self.augment:  # random crop -> S x S, mirrored with p = 1/2
            return dict(flip=recipe.flip, shorter=None)
        return dict(flip=False, shorter=recipe.resize_size)  # resize 256, center crop 224

    def _explain(self, err: Exception, inflight: list) -> None:
        """DALI names no file when a decode fails: find the culprit among the batches in flight."""
        for idx in inflight:
            for i in idx.tolist():
                found = decode_problem(self.dataset.files[i])
                if found is not None:
                    raise ValueError(f"{self.dataset.where(i)}: {found[1]}: {self.dataset.files[i]} (DALI stopped on it; "
                                     "`ride-fast data check` finds every such image, data.skip_bad_images=true leaves "
                                     "them out)") from err


class DaliArrayLoader(_DaliLoaderBase):
    """CIFAR-size ArrayDatasets through DALI, fed from host memory by `fn.external_source` (the
    InMemoryLoader keeps such data on the training device instead, and is the default)."""

    def __init__(self, dataset: ArrayDataset, batch_size: int, **kw):
        super().__init__(dataset, batch_size, **kw)
        self._hwc = dataset.images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, K] uint8

    def _feed(self, idx: np.ndarray) -> list[np.ndarray]:
        return list(self._hwc[idx])

    def _build(self, source, device_id, seed):
        return array_pipeline(source, self.dataset, train=self.augment, batch_size=self.batch_size,
                              num_threads=self.num_threads, device_id=device_id, seed=seed)


__all__ = ["DALI_PACKAGE", "DaliArrayLoader", "DaliImageLoader", "array_pipeline", "dali_available", "image_pipeline"]
