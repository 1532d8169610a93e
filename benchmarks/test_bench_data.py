"""Images/s of the photo loaders: the DALI CPU training pipeline against the torch (PIL +
DataLoader) fallback, on the same ImageNet-sized JPEGs, with the ImageNet-LT training recipe
(RandomResizedCrop 224, flip, colour jitter 0.4, normalise).

    pytest benchmarks/test_bench_data.py --benchmark-only     measure (2 DALI threads / 2 workers)
    pytest benchmarks/test_bench_data.py --benchmark-disable  run each case once (CI)

`extra_info["images_per_s"]` is the number to record in BENCHMARKS.md;
`test_dali_cpu_vs_torch_speedup` times both loaders in alternation (fairer on a shared machine)
and records the ratio of the median epochs, for epochs of 96 and of 384 images (the same photos
listed 4 times: the epoch start weighs less). Both loaders apply the same colour maps
(`transforms.ColourMaps`: jitter + normalisation); the DALI CPU training path decodes only the
random crop in DALI's threads and resizes + finishes it with torch in a thread pool
(`dali.finish_crops`), the torch loader decodes and crops with PIL in worker processes and
finishes the batch in the main process.

On a GPU: the CIFAR path (whole data set on the device, batched augmentation) and the torch
photo path with jitter + normalisation on the GPU (DALI is not installed on the GPU machines).
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
    """96 JPEGs of 500x375 / 375x500 (ImageNet's typical sizes, quality 90, ~50 KB each)."""
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


def _epoch(loader):
    n = 0
    for batch in loader:
        n += batch.labels.numel()
    if batch.images.is_cuda:
        torch.cuda.synchronize()
    return n


def _dali_loader(ds):
    from ride_fast.data.dali import DaliImageLoader

    return DaliImageLoader(ds, BATCH, train=True, num_workers=WORKERS, channels_last=True)


def _torch_loader(ds, device="cpu"):
    return TorchImageLoader(ds, BATCH, train=True, num_workers=WORKERS, channels_last=True, device=device)


def _measure(benchmark, loader, **info):
    torch.set_num_threads(1)  # the main process only normalises; workers / DALI threads decode
    _epoch(loader)  # warm-up: page cache, worker start, pipeline build
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
@pytest.mark.parametrize("times", [1, 4], ids=["epoch96", "epoch384"])
def test_dali_cpu_vs_torch_speedup(benchmark, photos, times):
    """Both loaders in alternation (a shared machine's load hits both alike); records the ratio,
    for 3-batch epochs and for 12-batch epochs (closer to the steady state of a real epoch)."""
    torch.set_num_threads(1)
    ds = _longer(photos, times) if times > 1 else photos
    loaders = {"dali": _dali_loader(ds), "torch": _torch_loader(ds)}
    for loader in loaders.values():
        _epoch(loader)
    seconds = {k: [] for k in loaders}

    def one_round():
        for name, loader in loaders.items():
            start = time.perf_counter()
            _epoch(loader)
            seconds[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=5 if times == 1 else 3, iterations=1)
    n = len(ds) // BATCH * BATCH
    rates = {k: n / float(np.median(v)) for k, v in seconds.items()}
    benchmark.extra_info.update({f"{k}_images_per_s": round(v, 1) for k, v in rates.items()})
    benchmark.extra_info.update(dali_speedup=round(rates["dali"] / rates["torch"], 2), epoch_images=n)
    assert all(v > 0 for v in rates.values())


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
