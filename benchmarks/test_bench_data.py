"""Images/s of the photo loaders: the DALI CPU training pipeline against the torch (PIL +
DataLoader) fallback, on the same ImageNet-sized JPEGs, with the ImageNet-LT training recipe
(RandomResizedCrop 224, flip, colour jitter 0.4, normalise).

    pytest benchmarks/test_bench_data.py --benchmark-only     measure (2 DALI threads / 2 workers)
    pytest benchmarks/test_bench_data.py --benchmark-disable  run each case once (CI)

`extra_info["images_per_s"]` is the loader's throughput (a timed run keeps it under
benchmarks/results/data/);
`test_dali_cpu_vs_torch_speedup` times both loaders in alternation (fairer on a shared machine)
and records the ratio of the median epochs: training epochs of 96 and of 384 images (the same
photos listed 4 times: the epoch start weighs less) and evaluation passes of 384. Both loaders
apply the same colour maps (`transforms.ColourMaps`: jitter + normalisation); the DALI CPU path
decodes the random crop (or the whole image, evaluation) in DALI's threads and resizes +
finishes it with torch in a thread pool (`dali.finish_crops`), the torch loader decodes and crops
with PIL in worker processes and finishes the batch in the main process.
`test_cpu_cost_per_image_by_stage` times each stage alone on one thread: the ratio it records
(`stage_ceiling`) bounds the speedup the loaders can show when both saturate the cores.

On a GPU: the CIFAR path (whole data set on the device, batched augmentation) and the torch
photo path with jitter + normalisation on the GPU (DALI's GPU pipeline is not timed here).
RIDE_FAST_BENCH_THREADS sets the threads / workers.
"""
import os
import time

import numpy as np
import pytest
import torch

from ride_fast.data import ArrayDataset, ImageListDataset, ImageRecipe, InMemoryLoader
from ride_fast.data.dali import dali_available
from ride_fast.data.torch_loader import TorchImageLoader

N_IMAGES = 96
BATCH = 32
WORKERS = int(os.environ.get("RIDE_FAST_BENCH_THREADS", os.cpu_count() or 1))
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def _photo(width: int, height: int, seed: int):
    """A photo-like JPEG-friendly picture: gradients, waves, texture noise."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 80 * np.sin(x / rng.uniform(8, 40)) * np.cos(y / rng.uniform(8, 40))
    img = np.stack([r, 255 * x / width, 255 * y / height], -1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> ImageListDataset:
    """96 JPEGs of 500x375 / 375x500 (ImageNet's typical sizes, quality 90)."""
    root = tmp_path_factory.mktemp("bench_photos")
    files = []
    for i in range(N_IMAGES):
        w, h = (500, 375) if i % 4 else (375, 500)
        path = root / f"{i:04d}.JPEG"
        _photo(w, h, i).save(path, "JPEG", quality=90)
        files.append(str(path))
    return ImageListDataset(files, torch.arange(N_IMAGES) % 10, 10, name="bench", recipe=ImageRecipe(jitter=0.4))


def _longer(ds: ImageListDataset, times: int) -> ImageListDataset:
    """The same photos listed `times` over: epochs of times x 96 images (12 batches for 4), where
    the start of an epoch (the first batch decoded with nothing to overlap, in both loaders) weighs
    little, as in a real epoch of thousands of batches."""
    return ImageListDataset(ds.files * times, ds.labels.repeat(times), ds.num_classes, name="bench", recipe=ds.recipe)


def _epoch(loader, check: bool = False):
    """Images in one pass of `loader`; check=True also checks every batch (`_check_batch`)."""
    n = 0
    for batch in loader:
        if check:
            _check_batch(batch, loader.dataset)
        n += batch.labels.numel()
    if batch.images.is_cuda:
        torch.cuda.synchronize()
    return n


def _check_batch(batch, ds) -> None:
    """What a training step needs: float32 [b, 3, S, S] channels-last, normalised colours of [0, 1]
    pixels (so the range the normalisation maps [0, 1] to), not constant, labels of the data set."""
    x, S = batch.images, ds.recipe.crop_size
    assert x.dtype == torch.float32 and x.shape[1:] == (3, S, S) and x.is_contiguous(memory_format=torch.channels_last)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (ds.mean, ds.std))
    assert (x >= -mean / std - 1e-4).all() and (x <= (1 - mean) / std + 1e-4).all()
    assert float(x.std()) > 0.1
    assert batch.labels.shape == (x.shape[0],) and set(batch.labels.tolist()) <= set(ds.labels.tolist())


def _expected(ds, train: bool) -> int:
    """Images in an epoch: training drops the last partial batch, evaluation sees every image."""
    return len(ds) // BATCH * BATCH if train else len(ds)


def _dali_loader(ds, train=True):
    from ride_fast.data.dali import DaliImageLoader

    return DaliImageLoader(ds, BATCH, train=train, num_workers=WORKERS, channels_last=True)


def _torch_loader(ds, device="cpu", train=True):
    return TorchImageLoader(ds, BATCH, train=train, num_workers=WORKERS, channels_last=True, device=device)


def _measure(benchmark, loader, **info):
    torch.set_num_threads(1)  # the main process only normalises; workers / DALI threads decode
    assert _epoch(loader, check=True) == _expected(loader.dataset, train=True)  # warm-up: page cache, worker start, pipeline build
    epochs = iter(range(1, 10_000))
    benchmark.pedantic(lambda: (loader.set_epoch(next(epochs)), _epoch(loader)), rounds=3, iterations=1)
    if benchmark.stats is not None and benchmark.stats.stats.mean:
        benchmark.extra_info["images_per_s"] = N_IMAGES // BATCH * BATCH / benchmark.stats.stats.mean
    benchmark.extra_info.update(workers=WORKERS, batch=BATCH, images=N_IMAGES, torch=torch.__version__, **info)


@needs_dali
def test_dali_cpu_training_pipeline_images_per_s(benchmark, photos):
    import nvidia.dali

    _measure(benchmark, _dali_loader(photos), kind="dali-cpu", dali=nvidia.dali.__version__)


def test_torch_loader_training_images_per_s(benchmark, photos):
    _measure(benchmark, _torch_loader(photos), kind="torch-pil")


@needs_dali
@pytest.mark.parametrize("times,train", [(1, True), (4, True), (4, False)],
                         ids=["epoch96", "epoch384", "evaluation384"])
def test_dali_cpu_vs_torch_speedup(benchmark, photos, times, train):
    """Both loaders in alternation (a shared machine's load hits both alike); records the ratio,
    for 3-batch epochs and for 12-batch epochs (closer to the steady state of a real epoch) of
    training, and for evaluation passes (decode, resize 256, center crop 224, normalise)."""
    torch.set_num_threads(1)
    ds = _longer(photos, times) if times > 1 else photos
    loaders = {"dali": _dali_loader(ds, train=train), "torch": _torch_loader(ds, train=train)}
    for loader in loaders.values():
        assert _epoch(loader, check=True) == _expected(ds, train)
    seconds = {k: [] for k in loaders}

    def one_round():
        for name, loader in loaders.items():
            start = time.perf_counter()
            _epoch(loader)
            seconds[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=5 if times == 1 else 3, iterations=1)
    n = len(ds) // BATCH * BATCH if train else len(ds)
    rates = {k: n / float(np.median(v)) for k, v in seconds.items()}
    benchmark.extra_info.update({f"{k}_images_per_s": round(v, 1) for k, v in rates.items()})
    benchmark.extra_info.update(dali_speedup=round(rates["dali"] / rates["torch"], 2), epoch_images=n)
    assert all(v > 0 for v in rates.values())
    if not benchmark.disabled and times > 1:  # timing, at the steady state: DALI's CPU path is the faster one
        assert rates["dali"] > rates["torch"], rates


@needs_dali
def test_cpu_cost_per_image_by_stage(benchmark, photos):
    """Time per image of each stage alone, on one thread, data in cache: why the ratio above is
    bounded. Both decoders are libjpeg-turbo, and Huffman decoding (which ROI decoding cannot skip
    above the crop's last row) dominates both. Records ms per image and the ratio of the two
    loaders' summed stages, the speedup DALI could reach if neither had any other cost."""
    from collections import deque

    from ride_fast.data.dali import finish_crops, image_pipeline
    from ride_fast.data.samplers import epoch_rng
    from ride_fast.data.torch_loader import load_rgb, transform_image
    from ride_fast.data.transforms import finish_batch

    torch.set_num_threads(1)
    ds, n = photos, BATCH
    encoded = [np.fromfile(f, dtype=np.uint8) for f in ds.files[:n]]
    mean, std, recipe = ds.mean, ds.std, ds.recipe

    def dali_decode(train: bool):
        """One batch through a 1-thread pipeline with no prefetch: its run time is decode time
        (a CPU pipeline ends at the decoded crops, train, or whole images, evaluation)."""
        feed = deque([encoded] * 64)
        pipe = image_pipeline(lambda: feed.popleft(), recipe, train=train, batch_size=n, num_threads=1,
                              device_id=None, seed=1, prefetch=1)
        pipe.build()
        pipe.run()  # warm-up
        return pipe

    from nvidia.dali.tensors import TensorListCPU

    rois, fulls = dali_decode(True), dali_decode(False)
    (out,) = rois.run()  # copied: the pipeline reuses its output buffers when it runs again
    crops = TensorListCPU([np.array(out[i]) for i in range(len(out))], "HWC")
    gen = torch.Generator().manual_seed(0)
    pil = [load_rgb(f) for f in ds.files[:n]]
    rng = epoch_rng(0, 0, 2)
    uint8 = torch.from_numpy(np.stack([transform_image(im, recipe, True, rng) for im in pil]))

    def pil_crops():
        for f in ds.files[:n]:
            transform_image(load_rgb(f), recipe, True, rng)

    stages = {
        "dali_roi_decode": lambda: rois.run(),
        "dali_full_decode": lambda: fulls.run(),
        "dali_finish_crops": lambda: finish_crops(crops, recipe.crop_size, mean, std, flip=True, jitter=recipe.jitter,
                                                  gen=gen, channels_last=True),
        "pil_decode": lambda: [load_rgb(f) for f in ds.files[:n]],
        "pil_decode_crop_resize": pil_crops,
        "finish_batch": lambda: finish_batch(uint8, mean, std, jitter=recipe.jitter, gen=gen, channels_last=True),
    }
    best = {k: float("inf") for k in stages}

    def one_round():
        for name, stage in stages.items():  # alternated, best of the rounds: the least disturbed
            start = time.perf_counter()  # wall time: the DALI thread works while this one waits
            stage()
            best[name] = min(best[name], (time.perf_counter() - start) / n)

    benchmark.pedantic(one_round, rounds=5, iterations=1)
    ms = {k: round(v * 1e3, 3) for k, v in best.items()}
    dali = ms["dali_roi_decode"] + ms["dali_finish_crops"]
    torch_loader = ms["pil_decode_crop_resize"] + ms["finish_batch"]
    benchmark.extra_info.update({f"{k}_ms": v for k, v in ms.items()})
    benchmark.extra_info.update(stage_ceiling=round(torch_loader / dali, 2))
    assert all(v > 0 for v in ms.values())
    # the stages timed are the loaders' work: n crops of the recipe's size, finished alike
    S = recipe.crop_size
    assert len(crops) == n and uint8.shape == (n, S, S, 3)
    a = stages["dali_finish_crops"]()
    assert a.shape == (n, 3, S, S) and torch.isfinite(a).all()


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_cifar_in_memory_images_per_s(benchmark):
    """CIFAR-100-LT-sized data kept whole on the GPU, batches gathered + augmented there."""
    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset(torch.randint(0, 256, (10_847, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.arange(10_847) % 100, 100, (0.5,) * 3, (0.25,) * 3, "cifar-size", rotate=15.0)
    loader = InMemoryLoader(ds, 128, train=True, device="cuda", channels_last=True)
    _epoch(loader)
    benchmark.pedantic(lambda: _epoch(loader), rounds=5, iterations=1)
    if benchmark.stats is not None and benchmark.stats.stats.mean:
        benchmark.extra_info["images_per_s"] = len(loader) * 128 / benchmark.stats.stats.mean
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), kind="memory-gpu")


@pytest.mark.gpu
def test_gpu_torch_photo_loader_images_per_s(benchmark, photos):
    _measure(benchmark, _torch_loader(photos, device="cuda"), kind="torch-pil-gpu", device=torch.cuda.get_device_name())
