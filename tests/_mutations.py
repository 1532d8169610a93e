"""Deliberate breakages for tests/test_mutations.py, as a pytest plugin: `pytest -p _mutations` with
RIDE_FAST_MUTATION=<name> applies MUTATIONS[name] before any test module is imported (so names the
tests import from the package are the broken ones). Each mutation removes one behaviour while
keeping the code running; test_mutations.py asserts that the tests written for that behaviour fail.
"""
from __future__ import annotations

import contextlib
import os


def autocast_off() -> None:
    """train.amp asks for bf16/fp16 and the step runs in float32."""
    import ride_fast.engine.runtime as runtime
    import ride_fast.engine.step as step

    off = lambda device, amp: contextlib.nullcontext()  # noqa: E731
    runtime.autocast_context = step.autocast_context = off


def momentum_ignored() -> None:
    """build_optimizer's SGD steps without momentum (its defaults still say 0.9)."""
    import ride_fast.engine.optim as optim

    build = optim.build_optimizer

    def no_momentum(model, cfg, device):
        opt = build(model, cfg, device)
        for group in opt.param_groups:
            group["momentum"] = 0.0
        return opt

    optim.build_optimizer = no_momentum


def flip_never() -> None:
    import ride_fast.data.transforms as transforms

    transforms.random_hflip = lambda x, gen: x


def crop_identity() -> None:
    import ride_fast.data.transforms as transforms

    transforms.random_crop = lambda x, padding, gen: x


def rotation_mirrored() -> None:
    """The rotation turns the other way (the angle's sign lost)."""
    import ride_fast.data.transforms as transforms

    rotate = transforms.random_rotate

    def mirrored(x, degrees, gen):
        return rotate(x.flip(-1), degrees, gen).flip(-1)

    transforms.random_rotate = mirrored


def jitter_dropped() -> None:
    """finish_batch draws the colour maps but does not apply them."""
    import ride_fast.data.transforms as transforms

    finish = transforms.finish_batch

    def without_jitter(x, mean, std, *, jitter=0.0, gen=None, channels_last=False):
        if jitter and gen is not None:
            transforms.jitter_maps(x.shape[0], jitter, gen)  # the draws still happen
        return finish(x, mean, std, channels_last=channels_last)

    transforms.finish_batch = without_jitter


def router_dense() -> None:
    """Routed inference runs every expert on every image and masks the result: the same logits and
    usage counts, the cost of the all-experts pass."""
    import torch

    import ride_fast.router as router_pkg
    import ride_fast.router.inference as inference

    @torch.no_grad()
    def dense(model, router, images, *, threshold=0.5, decisions=None):
        E, B = model.num_experts, images.shape[0]
        trunk = model.forward_trunk(images)
        outs = [model.forward_expert(i, trunk) for i in range(E)]
        z = [o[0].float() for o in outs]
        active = torch.ones(B, dtype=torch.bool)
        used = torch.ones(B, dtype=torch.long)
        total, running = z[0].clone(), z[0].clone()
        for i in range(E - 1):
            keep = decisions[i] if decisions is not None else torch.sigmoid(router(i, outs[i][1], running / (i + 1)).float()) > threshold
            active = active & keep
            total += z[i + 1] * active[:, None]
            used += active.long()
            running = running + z[i + 1]
        return inference.RoutedOutput(total / used[:, None].float(), used, E)

    inference.routed_forward = router_pkg.routed_forward = dense


def fused_loss_to_reference() -> None:
    """loss.impl=auto falls back to the reference (autograd) loss instead of the fused/analytic one."""
    import sys

    import ride_fast.ops.ride_loss  # noqa: F401  (the package re-exports a function of the same name)

    ride_loss = sys.modules["ride_fast.ops.ride_loss"]
    reference = ride_loss.ride_loss_reference

    def through_reference(z, y, margins, weights, temperature, lam, tm, diversity, use_triton, need_grad, weight_sum=None,
                          grad_in_forward=False, grad_scale=1.0):
        empty = z.new_empty(0)
        return reference(z, y, margins, weights, temperature, lam, tm, diversity, weight_sum=weight_sum), empty, empty, empty

    ride_loss._ride_loss_op = through_reference


def fused_norm_to_reference() -> None:
    """batch_norm_act never runs the C kernels (PyTorch's BatchNorm, add and ReLU instead)."""
    import sys

    import ride_fast.ops.batch_norm_act  # noqa: F401

    sys.modules["ride_fast.ops.batch_norm_act"].fused_path_taken = lambda bn, x, residual=None: False


def conv3x3_to_module() -> None:
    """conv3x3 never runs the C kernel (the module's convolution, oneDNN, instead)."""
    import sys

    import ride_fast.ops.conv3x3  # noqa: F401

    sys.modules["ride_fast.ops.conv3x3"].fast_path_taken = lambda conv, x: False


def bf16_conv3x3_to_onednn() -> None:
    """Under bf16 autocast conv3x3 never runs the C kernel (oneDNN's bf16 convolution, even where
    this CPU's bf16 products are slow)."""
    import sys

    import torch

    import ride_fast.ops.conv3x3  # noqa: F401

    module = sys.modules["ride_fast.ops.conv3x3"]
    taken = module.fast_path_taken
    module.fast_path_taken = lambda conv, x: False if torch.is_autocast_enabled("cpu") else taken(conv, x)


def batched_ignored() -> None:
    """model.batched=true builds the per-expert network."""
    import ride_fast.models as models

    create = models.create_model

    def per_expert(*args, batched=False, **kwargs):
        return create(*args, **kwargs)

    models.create_model = per_expert


def channels_last_ignored() -> None:
    """Modules moved to channels-last memory stay contiguous (NCHW)."""
    import torch

    to = torch.nn.Module.to

    def to_nchw(self, *args, **kwargs):
        if kwargs.get("memory_format") is torch.channels_last:
            kwargs["memory_format"] = torch.contiguous_format
        return to(self, *args, **kwargs)

    torch.nn.Module.to = to_nchw


MUTATIONS = {f.__name__: f for f in (autocast_off, momentum_ignored, flip_never, crop_identity, rotation_mirrored,
                                     jitter_dropped, router_dense, fused_loss_to_reference, batched_ignored,
                                     channels_last_ignored, fused_norm_to_reference, conv3x3_to_module,
                                     bf16_conv3x3_to_onednn)}


def pytest_configure(config):
    name = os.environ.get("RIDE_FAST_MUTATION", "")
    if name:
        MUTATIONS[name]()
