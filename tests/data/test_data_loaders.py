"""Loaders: DALI CPU pipelines and the torch fallback give the same labels and the same evaluation
tensors (within JPEG-decoder tolerance), reproducible training epochs, sharding, bad images; the
in-memory loader (ride_fast.data.loader)."""
import logging

import pytest
import torch

from _photo_tree import TRAIN_COUNTS
from ride_fast.config import DataConfig
from ride_fast.data import ArrayDataset, Batch, InMemoryLoader, ShuffleSampler, build_datasets, build_loaders, choose_loader
from ride_fast.data.dali import dali_available
from ride_fast.data.mnist_lt import build_mnist_lt
from ride_fast.data.torch_loader import BadImageError, TorchImageLoader
from ride_fast.engine.trainer import _seek

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
# One quantisation step of the decoded image, normalised by the smallest ImageNet std: DALI and PIL
# use the same libjpeg decoding and the same resampling filter; they differ by rounding only.
EVAL_TOL = 1.0 / 255 / 0.224 + 1e-4


def cfg(root, **kw) -> DataConfig:
    base = dict(name="imagenet_lt", root=str(root), num_classes=len(TRAIN_COUNTS), image_size=224, num_workers=0,
                batch_size=4, eval_batch_size=4)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def photo_sets(photo_tree):
    return build_datasets(cfg(photo_tree))


def _eval_pass(loader):
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


def test_torch_loader_evaluation_is_deterministic_and_complete(photo_sets):
    _, test = photo_sets
    loader = TorchImageLoader(test, 4, train=False, num_workers=0, channels_last=True)
    assert len(loader) == 3
    x, y = _eval_pass(loader)
    assert x.shape == (len(test), 3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(y, test.labels)  # every image once, in order; the last batch is partial
    assert loader.__iter__().__next__().images.is_contiguous(memory_format=torch.channels_last)
    x2, _ = _eval_pass(TorchImageLoader(test, 3, train=False, num_workers=2))
    assert torch.equal(x, x2)  # batch size and worker processes change nothing
    # normalised photos: roughly zero mean, unit spread; grey JPEGs give three equal channels
    assert abs(x.mean().item()) < 1.0 and 0.3 < x.std().item() < 2.0
    from PIL import Image

    grey = [i for i, f in enumerate(test.files) if Image.open(f).mode == "L"]
    assert grey
    mean, std = torch.tensor(test.mean).view(3, 1, 1), torch.tensor(test.std).view(3, 1, 1)
    for i in grey:
        pixels = x[i] * std + mean
        assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)


def test_torch_loader_training_epochs_are_reproducible(photo_sets):
    train, _ = photo_sets
    loader = TorchImageLoader(train, 8, train=True, num_workers=0, seed=3)
    assert len(loader) == 2  # 17 images: the last batch of one is dropped
    runs = []
    for epoch in (1, 1, 2):
        loader.set_epoch(epoch)
        runs.append([(b.images, b.labels) for b in loader])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0][0], runs[2][0][0])
    assert runs[0][0][0].shape == (8, 3, 224, 224)


@pytest.mark.parametrize("kind", ["torch", "memory", "dali"])
def test_a_loader_resumes_mid_epoch_with_the_batches_of_an_uninterrupted_epoch(photo_sets, kind):
    """set_epoch(e, start_batch=k) (the trainer's mid-epoch resume) gives batches k.. of epoch e bit for
    bit (jitter and flips included); a loader without start_batch is skipped by the trainer instead."""
    if kind == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    train, _ = photo_sets
    if kind == "torch":
        loader = TorchImageLoader(train, 4, train=True, num_workers=0, seed=5)
    elif kind == "memory":
        g = torch.Generator().manual_seed(0)
        ds = ArrayDataset(torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(30) % 3, 3,
                          (0.5,) * 3, (0.25,) * 3, "toy", flip=True, rotate=10.0)
        loader = InMemoryLoader(ds, 4, train=True, seed=5)
    else:
        from ride_fast.data.dali import DaliImageLoader

        loader = DaliImageLoader(train, 4, train=True, num_workers=1, seed=5)
    loader.set_epoch(2)
    full = [(b.images, b.labels) for b in loader]
    assert loader.seekable == (kind != "dali")
    if loader.seekable:
        loader.set_epoch(2, start_batch=2)
        rest = [(b.images, b.labels) for b in loader]
    else:  # DALI: the trainer discards the first batches of the epoch
        with pytest.raises(TypeError, match="cannot start an epoch at batch 2"):
            loader.set_epoch(2, start_batch=2)
        assert _seek(loader, 2, 2) == 2
        rest = [(b.images, b.labels) for b in loader][2:]
    assert len(rest) == len(full) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], rest))
    again = [b.labels for b in loader]  # start_batch applies to one iteration
    assert len(again) == len(full)
    if loader.seekable:
        with pytest.raises(ValueError, match="outside an epoch"):
            loader.set_epoch(2, start_batch=len(full) + 1)


def test_colour_jitter_follows_the_recipe(photo_sets):
    train, _ = photo_sets
    from dataclasses import replace

    plain = replace(train, recipe=replace(train.recipe, jitter=0.0))
    a = next(iter(TorchImageLoader(train, 8, train=True, num_workers=0, seed=0))).images
    b = next(iter(TorchImageLoader(plain, 8, train=True, num_workers=0, seed=0))).images
    assert a.shape == b.shape and not torch.allclose(a, b)  # same crops, jittered colours


def test_torch_loader_skips_unreadable_images_at_run_time(fresh_tree, caplog):
    config = cfg(fresh_tree, verify_images="none")  # nothing checked up front
    train, test = build_datasets(config)
    bad = test.files[3]
    with open(bad, "r+b") as fh:
        fh.truncate(200)
    with pytest.raises(BadImageError, match=r"ImageNet_LT_test.txt:4: cannot decode \((?!\w*Error)") as err:
        list(TorchImageLoader(test, 4, train=False, num_workers=0))
    assert "Error" not in str(err.value)  # PIL's reason in words, not its exception's class name
    loader = TorchImageLoader(test, 4, train=False, num_workers=0, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="ride_fast.data"):
        x, y = _eval_pass(loader)
    assert len(y) == len(test) - 1 and loader.skipped == 1
    assert "left out 1 unreadable images this epoch" in caplog.text and bad in caplog.text


def test_loader_choice(photo_sets, monkeypatch):
    train, test = photo_sets
    arrays = ArrayDataset(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 1, 2]), 3, (0.5,) * 3, (0.5,) * 3)
    assert choose_loader(DataConfig(), arrays) == "memory"
    assert choose_loader(DataConfig(loader="torch"), arrays) == "memory"
    tl, el = build_loaders(DataConfig(batch_size=2), arrays, arrays)
    assert isinstance(tl, InMemoryLoader) and isinstance(el, InMemoryLoader)
    with pytest.raises(ValueError, match="data.loader=memory: imagenet_lt/train is read from image files"):
        build_loaders(cfg("x", loader="memory"), train, test)
    import ride_fast.data.dali as dali_mod

    monkeypatch.setattr(dali_mod, "dali_available", lambda: False)
    tl, el = build_loaders(cfg("x"), train, test)
    assert isinstance(tl, TorchImageLoader) and isinstance(el, TorchImageLoader)
    with pytest.raises(ValueError, match="global batch: it must be divisible by the 3 ranks"):
        build_loaders(cfg("x"), train, test, world_size=3)
    with pytest.raises(ValueError, match="decode_device=gpu needs a CUDA"):
        build_loaders(cfg("x", loader="dali", decode_device="gpu"), train, test)


def test_build_loaders_shards_evaluation_over_ranks(photo_sets):
    train, test = photo_sets
    seen = []
    for rank in range(3):
        _, el = build_loaders(cfg("x", loader="torch", batch_size=6, eval_batch_size=6), train, test, rank=rank, world_size=3)
        seen += torch.cat([b.labels for b in el]).tolist()
        assert el.batch_size == 2
    assert sorted(seen) == sorted(test.labels.tolist())
    tl, _ = build_loaders(cfg("x", loader="torch", batch_size=8), train, test, train_sampler="balanced", seed=1)
    tl.set_epoch(1)
    assert sum(len(b.labels) for b in tl) == 16


# ----------------------------------------------------------------------------------------- DALI


@needs_dali
def test_dali_and_torch_give_the_same_evaluation_tensors(photo_sets):
    """The deterministic evaluation path (decode, resize 256, center crop 224, normalise) of the
    DALI CPU pipeline equals the torch loader's within one JPEG-decoder quantisation step, for RGB,
    grey and CMYK JPEGs and RGBA / palette PNGs of several sizes."""
    from ride_fast.data.dali import DaliImageLoader

    _, test = photo_sets
    xd, yd = _eval_pass(DaliImageLoader(test, 4, train=False, num_workers=2, channels_last=True))
    xt, yt = _eval_pass(TorchImageLoader(test, 4, train=False, num_workers=0))
    assert torch.equal(yd, yt) and torch.equal(yd, test.labels)
    assert xd.shape == xt.shape == (len(test), 3, 224, 224)
    diff = (xd - xt).abs()
    assert diff.max().item() <= EVAL_TOL, diff.amax(dim=(1, 2, 3))
    assert diff.mean().item() < 0.2 * EVAL_TOL


@needs_dali
def test_dali_header_shape_is_the_decoded_shape_of_an_exif_rotated_photo():
    """The GPU evaluation pipeline sizes its resize from the headers (`stored_shape`) and decodes
    without EXIF rotation, as torchvision: a photo tagged "rotate 90" must give the same [H, W]
    both ways, or it would be stretched to the transposed size before the center crop."""
    import io

    import numpy as np
    from PIL import Image

    from ride_fast.data.dali import _dali, stored_shape

    dali, fn, types, _ = _dali()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    buf = io.BytesIO()
    Image.new("RGB", (50, 30), (200, 40, 40)).save(buf, "JPEG", exif=exif)  # W 50, H 30
    data = np.frombuffer(buf.getvalue(), dtype=np.uint8)

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None, seed=0)
    def shapes():
        encoded = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
        decoded = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)
        return stored_shape(encoded), decoded

    pipe = shapes()
    pipe.build()
    header, decoded = pipe.run()
    assert list(np.asarray(header.as_tensor())[0]) == [30, 50, 3] == list(decoded.as_tensor().shape()[1:])


@needs_dali
def test_dali_training_is_seeded_reshuffled_and_matches_torch_labels(photo_sets):
    from ride_fast.data.dali import DaliImageLoader

    train, _ = photo_sets
    dali = DaliImageLoader(train, 8, train=True, num_workers=2, seed=5)
    torch_loader = TorchImageLoader(train, 8, train=True, num_workers=0, seed=5)
    runs = []
    for epoch in (1, 1, 2):
        dali.set_epoch(epoch)
        torch_loader.set_epoch(epoch)
        runs.append([b for b in dali])
        assert [b.labels.tolist() for b in runs[-1]] == [b.labels.tolist() for b in torch_loader]  # the same sampler
    assert len(runs[0]) == len(dali) == 2
    assert all(torch.equal(a.images, b.images) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0].labels, runs[2][0].labels) or not torch.equal(runs[0][0].images, runs[2][0].images)
    x = runs[0][0].images
    assert x.shape == (8, 3, 224, 224) and torch.isfinite(x).all() and 0.3 < x.std().item() < 2.0


@needs_dali
def test_dali_sharded_evaluation_covers_every_image_once(photo_sets):
    from ride_fast.data.dali import DaliImageLoader

    train, test = photo_sets
    seen = []
    for rank in range(3):
        tl, el = build_loaders(cfg("x", loader="dali", batch_size=6, eval_batch_size=6), train, test, rank=rank, world_size=3)
        assert isinstance(el, DaliImageLoader)
        seen += torch.cat([b.labels for b in el]).tolist()
    assert sorted(seen) == sorted(test.labels.tolist())


@needs_dali
def test_dali_names_the_image_it_cannot_decode(fresh_tree):
    from ride_fast.data.dali import DaliImageLoader

    _, test = build_datasets(cfg(fresh_tree, verify_images="none"))
    with open(test.files[2], "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    with pytest.raises(ValueError, match=r"ImageNet_LT_test.txt:3: cannot decode .* \(DALI stopped on it"):
        list(DaliImageLoader(test, 4, train=False, num_workers=1))
    os_missing = test.files[5]
    import os

    os.remove(os_missing)
    with pytest.raises(FileNotFoundError, match=r"ImageNet_LT_test.txt:6: cannot read"):
        list(DaliImageLoader(test, 8, train=False, num_workers=1, sampler=ShuffleSampler(len(test), shuffle=False)))


@needs_dali
def test_dali_array_pipeline_crops_windows_of_the_padded_image():
    """CIFAR-size arrays fed from memory: each output is a shifted 32x32 window of the zero-padded
    image (no rotation here), evaluation is normalisation only; labels follow the sampler."""
    from ride_fast.data.dali import DaliArrayLoader

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    ds = ArrayDataset(images, torch.arange(10) % 3, 3, (0.0,) * 3, (1.0,) * 3, "tiny", flip=False, rotate=0.0)
    ev = DaliArrayLoader(ds, 4, train=False, num_workers=1)
    x, y = _eval_pass(ev)
    assert torch.equal(y, ds.labels) and torch.allclose(x * 255, images.float(), atol=1e-3)
    tr = DaliArrayLoader(ds, 5, train=True, num_workers=1, seed=2)
    tr.set_epoch(1)
    order = tr.sampler.indices()
    out = torch.cat([b.images for b in tr])
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4))
    for k, i in enumerate(order.tolist()):
        crop = (out[k] * 255).round()
        assert any(torch.equal(crop, padded[i, :, r : r + 32, c : c + 32]) for r in range(9) for c in range(9))
    rot = ArrayDataset(images, ds.labels, 3, (0.5,) * 3, (0.25,) * 3, "rot", flip=True, rotate=15.0)
    b = next(iter(DaliArrayLoader(rot, 10, train=True, num_workers=1)))
    assert b.images.shape == (10, 3, 32, 32) and torch.isfinite(b.images).all()


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_torch_loader_on_the_gpu_matches_the_cpu(photo_sets):
    _, test = photo_sets
    xc, yc = _eval_pass(TorchImageLoader(test, 4, train=False, num_workers=0))
    gpu = TorchImageLoader(test, 4, train=False, num_workers=2, device="cuda", channels_last=True)
    assert gpu.pin_memory
    xg, yg = _eval_pass(gpu)
    assert xg.is_cuda and yg.is_cuda and torch.equal(yg.cpu(), yc)
    assert torch.allclose(xg.cpu(), xc, atol=1e-5)
    train, _ = photo_sets
    b = next(iter(TorchImageLoader(train, 8, train=True, num_workers=2, device="cuda")))
    assert b.images.is_cuda and b.images.shape == (8, 3, 224, 224)


@pytest.mark.gpu
@needs_dali
def test_dali_mixed_decoding_on_the_gpu(photo_sets):
    from ride_fast.data.dali import DaliImageLoader

    _, test = photo_sets
    xg, yg = _eval_pass(DaliImageLoader(test, 4, train=False, num_workers=2, device="cuda"))
    xt, yt = _eval_pass(TorchImageLoader(test, 4, train=False, num_workers=0))
    assert xg.is_cuda and torch.equal(yg.cpu(), yt)
    assert (xg.cpu() - xt).abs().mean().item() < 0.05  # nvJPEG decodes slightly differently from libjpeg


def test_loader_covers_each_image_once_and_is_reproducible():
    train, test = build_mnist_lt()
    loader = InMemoryLoader(test, 300, train=False)
    labels = torch.cat([b.labels for b in loader])
    assert torch.equal(labels, test.labels)  # every test image once, in order, last batch partial
    tl = InMemoryLoader(train, 128, train=True, seed=3)
    tl.set_epoch(2)
    a = [b.images for b in tl]
    tl.set_epoch(2)
    b = [b.images for b in tl]
    tl.set_epoch(3)
    c = [b.images for b in tl]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    batch = next(iter(InMemoryLoader(train, 16, train=True, channels_last=True)))
    assert batch.images.shape == (16, 3, 32, 32) and batch.images.is_contiguous(memory_format=torch.channels_last)


def test_training_loader_never_yields_a_single_image_batch():
    ds = ArrayDataset(torch.zeros(9, 1, 8, 8, dtype=torch.uint8), torch.zeros(9, dtype=torch.long), 2, (0.5,), (0.5,))
    sizes = [b.labels.numel() for b in InMemoryLoader(ds, 4, train=True)]
    assert sizes == [4, 4]


def test_all_cores_means_this_ranks_share_of_the_cores_it_may_use(monkeypatch, photo_sets):
    """data.num_workers=-1 on an 8-GPU node: each of the 8 ranks takes its share of the cores the
    process may run on, not a worker per core of the machine each."""
    from ride_fast.data.dali import _threads
    from ride_fast.data.loader import cpus_per_rank

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpus_per_rank() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpus_per_rank() == 2 and _threads(-1) == 2 and _threads(3) == 3
    _, test = photo_sets
    assert TorchImageLoader(test, 4, train=False, num_workers=-1).num_workers == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more ranks than cores: one each
    assert cpus_per_rank() == 1
