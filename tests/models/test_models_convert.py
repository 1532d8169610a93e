"""Weights of the original RIDE code load into ride_fast models with identical logits.

The classes below are an independent, minimal transcription of the original module structure
and parameter names (frank-xwang/RIDE-LongTailRecognition: model/ldam_drw_resnets/
ride_resnet_cifar.py, model/fb_resnets/RIDEResNet.py / EAResNet.py, model/model.py): a shared
stem, ModuleLists `layer2s`/`layer3s` (CIFAR) or `layer3s`/`layer4s` (ImageNet), `linears`, the
router's `expert_help_pred_*`, wrapped as `backbone` (Model) and `module` (DataParallel).

Shape legend: B images, E experts, C classes.
"""
import os
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ride_fast.models import (
    CheckpointMismatchError,
    convert_original_checkpoint,
    create_model,
    load_checkpoint_file,
    load_original_state_dict,
)

C = 10


# --- transcription of the original modules (names matter, code is written for this test) -----


class OrigNormedLinear(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, c).uniform_(-1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class OrigCifarBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(out + sc)


def _cifar_layer(cin, cout, stride, n=5):
    return nn.Sequential(*[OrigCifarBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1) for b in range(n)])


class OrigCifarRIDE(nn.Module):
    """ride_resnet_cifar.ResNet_s (E > 1) or, with single=True, resnet_cifar.ResNet_s (E = 1)."""

    def __init__(self, num_experts, reduce=True, use_norm=True, single=False, top_k=5):  # k <= C: the top k of C logits
        super().__init__()
        w2, w3 = (24, 48) if reduce else (32, 64)
        self.single, self.s = single, (30 if use_norm else 1)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _cifar_layer(16, 16, 1)
        head = (lambda: OrigNormedLinear(w3, C)) if use_norm else (lambda: nn.Linear(w3, C))
        if single:
            self.layer2, self.layer3, self.linear = _cifar_layer(16, w2, 2), _cifar_layer(w2, w3, 2), head()
            return
        self.layer2s = nn.ModuleList([_cifar_layer(16, w2, 2) for _ in range(num_experts)])
        self.layer3s = nn.ModuleList([_cifar_layer(w2, w3, 2) for _ in range(num_experts)])
        self.linears = nn.ModuleList([head() for _ in range(num_experts)])
        self.expert_help_pred_hidden_fcs = nn.ModuleList([nn.Linear(w3, 16) for _ in range(num_experts - 1)])
        self.expert_help_pred_fc = nn.Linear(16 + top_k, 1)

    def forward(self, x):
        out = self.layer1(F.relu(self.bn1(self.conv1(x))))
        parts = [(self.layer2, self.layer3, self.linear)] if self.single else zip(self.layer2s, self.layer3s, self.linears)
        outs = []
        for l2, l3, lin in parts:
            f = l3(l2(out))
            f = F.avg_pool2d(f, f.size()[3]).view(f.size(0), -1)
            outs.append(lin(f) * self.s)
        return torch.stack(outs, dim=1)  # [B, E, C]


class OrigBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


def _r10_layer(cin, cout, stride):
    ds = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if (stride != 1 or cin != cout) else None
    return nn.Sequential(OrigBasicBlock(cin, cout, stride, ds))


class OrigImageNetRIDE(nn.Module):
    """The forward of the original's ImageNet networks (RIDEResNet / ResNeXt): shared stem, layer1,
    layer2, then per expert layer3s[i], layer4s[i], fixed 7x7 average pool, linears[i] times s."""

    def forward(self, x):
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        outs = []
        for l3, l4, lin in zip(self.layer3s, self.layer4s, self.linears):
            f = self.avgpool(l4(l3(x))).view(x.size(0), -1)
            outs.append(lin(f) * self.s)
        return torch.stack(outs, dim=1)


class OrigResNet10RIDE(OrigImageNetRIDE):
    """RIDEResNet.ResNet(BasicBlock, [1, 1, 1, 1]) reduced, cosine heads, fixed 7x7 pooling (224 px)."""

    def __init__(self, num_experts, top_k=30):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _r10_layer(64, 64, 1)
        self.layer2 = _r10_layer(64, 128, 2)
        self.layer3s = nn.ModuleList([_r10_layer(128, 192, 2) for _ in range(num_experts)])
        self.layer4s = nn.ModuleList([_r10_layer(192, 384, 2) for _ in range(num_experts)])
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.linears = nn.ModuleList([OrigNormedLinear(384, C) for _ in range(num_experts)])
        self.expert_help_pred_hidden_fcs = nn.ModuleList([nn.Linear(384, 16) for _ in range(num_experts - 1)])
        self.expert_help_pred_fc = nn.Linear(16 + top_k, 1)
        self.s = 30


class OrigBottleneck(nn.Module):
    """The original's Bottleneck (fb_resnets): 1x1, 3x3 (grouped for ResNeXt), 1x1 x4, shortcut."""

    def __init__(self, cin, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class OrigBottleneckRIDE(OrigImageNetRIDE):
    """RIDEResNet / ResNeXt (fb_resnets) with Bottleneck blocks [3, 4, 6, 3]: shared stem, layer1,
    layer2; per-expert layer3s / layer4s (reduced 192 / 384 planes), fixed 7x7 pooling (224 px)."""

    def __init__(self, num_experts, groups=1, width_per_group=64, reduce=True, use_norm=True, top_k=50):
        super().__init__()
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 64
        self.layer1 = self._make_layer(64, 3)
        self.inplanes = self.next_inplanes
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.inplanes = self.next_inplanes
        p3, p4 = (192, 384) if reduce else (256, 512)
        self.layer3s = nn.ModuleList([self._make_layer(p3, 6, stride=2) for _ in range(num_experts)])
        self.inplanes = self.next_inplanes
        self.layer4s = nn.ModuleList([self._make_layer(p4, 3, stride=2) for _ in range(num_experts)])
        self.avgpool = nn.AvgPool2d(7, stride=1)
        head = (lambda: OrigNormedLinear(p4 * 4, C)) if use_norm else (lambda: nn.Linear(p4 * 4, C))
        self.linears = nn.ModuleList([head() for _ in range(num_experts)])
        self.expert_help_pred_hidden_fcs = nn.ModuleList([nn.Linear(p4 * 4, 16) for _ in range(num_experts - 1)])
        self.expert_help_pred_fc = nn.Linear(16 + top_k, 1)
        self.s = 30 if use_norm else 1

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
        layers = [OrigBottleneck(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.next_inplanes = planes * 4
        layers += [OrigBottleneck(self.next_inplanes, planes, groups=self.groups, base_width=self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


class Model(nn.Module):  # the original's Model wrapper: parameters under `backbone.`
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


class DataParallelLike(nn.Module):  # nn.DataParallel: parameters under `module.`
    def __init__(self, module):
        super().__init__()
        self.module = module


def randomise(net: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics, so that every tensor has to land in the right place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(123)
            elif isinstance(m, (nn.Conv2d, nn.Linear, OrigNormedLinear)):
                for p in m.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
    return net.eval()


def wrapped_state_dict(net: nn.Module, prefix: str) -> dict:
    wrapper = Model(net) if prefix == "backbone." else DataParallelLike(Model(net))
    sd = wrapper.state_dict()
    assert all(k.startswith(prefix) for k in sd)
    return sd


def _images(px, seed=0):
    return torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(seed))


# --- tests --------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("prefix", ["backbone.", "module.backbone."])
@pytest.mark.parametrize("raw", [False, True], ids=["state_dict", "raw_checkpoint"])
def test_cifar_original_weights_give_identical_logits(prefix, raw):
    orig = randomise(OrigCifarRIDE(2), seed=1)
    sd = wrapped_state_dict(orig, prefix)
    checkpoint = {"arch": "ResNet32Model", "epoch": 200, "state_dict": sd, "monitor_best": 48.0} if raw else sd
    model = create_model("resnet32", num_classes=C, num_experts=2).eval()
    info = load_original_state_dict(model, checkpoint)
    assert set(info["router"]) == {f"expert_help_pred_hidden_fcs.0.{p}" for p in ("weight", "bias")} | {"expert_help_pred_fc.weight", "expert_help_pred_fc.bias"}
    assert info["loaded"] == len(model.state_dict())
    x = _images(32)
    expected = orig(x)  # [B, E, C]
    out = model(x)
    torch.testing.assert_close(out.expert_logits, expected.transpose(0, 1))
    torch.testing.assert_close(out.logits, expected.mean(1))
    assert model.trunk.bn1.num_batches_tracked.item() == 123


@torch.no_grad()
@pytest.mark.parametrize("prefix", ["backbone.", "module.backbone."])
def test_resnet10_original_weights_give_identical_logits(prefix):
    orig = randomise(OrigResNet10RIDE(2), seed=2)
    model = create_model("resnet10", num_classes=C, num_experts=2).eval()
    info = load_original_state_dict(model, wrapped_state_dict(orig, prefix))
    assert len(info["router"]) == 4
    x = _images(224)  # the original's fixed 7x7 pooling is global only at 224 px
    expected = orig(x)
    out = model(x)
    torch.testing.assert_close(out.expert_logits, expected.transpose(0, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits, expected.mean(1), rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name,groups,width", [("resnet50", 1, 64), ("resnext50_32x4d", 32, 4)])
def test_resnet50_and_resnext50_original_weights_give_identical_logits_at_224px(name, groups, width):
    orig = randomise(OrigBottleneckRIDE(2, groups=groups, width_per_group=width), seed=8)
    model = create_model(name, num_classes=C, num_experts=2).eval()
    info = load_original_state_dict(model, wrapped_state_dict(orig, "module.backbone."))
    assert info["loaded"] == len(model.state_dict()) and len(info["router"]) == 4
    x = _images(224)[:1]  # the original's fixed 7x7 pooling is global only at 224 px; one image keeps it quick
    expected = orig(x)
    out = model(x)
    torch.testing.assert_close(out.expert_logits, expected.transpose(0, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits, expected.mean(1), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_single_expert_baseline_layout():
    """The original's E = 1 baseline (resnet_cifar.ResNet_s: layer2, layer3, linear), not reduced, Linear head."""
    orig = randomise(OrigCifarRIDE(1, reduce=False, use_norm=False, single=True), seed=3)
    model = create_model("resnet32", num_classes=C, num_experts=1, reduce_dimension=False, use_norm=False).eval()
    info = load_original_state_dict(model, wrapped_state_dict(orig, "backbone."))
    assert info["router"] == {}
    x = _images(32, seed=3)
    torch.testing.assert_close(model(x).expert_logits, orig(x).transpose(0, 1), rtol=1e-4, atol=1e-4)


def test_wrong_expert_count_is_a_clear_error():
    sd = wrapped_state_dict(OrigCifarRIDE(3), "module.backbone.")
    model = create_model("resnet32", num_classes=C, num_experts=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"the checkpoint has 3 experts \(layer3s\.0\.\.2\) but the model has 2.*num_experts=3"):
        load_original_state_dict(model, sd)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_wrong_width_and_head_type_are_named():
    sd = wrapped_state_dict(OrigCifarRIDE(2), "backbone.")
    model = create_model("resnet32", num_classes=C, num_experts=2, reduce_dimension=False)
    with pytest.raises(CheckpointMismatchError) as info:
        load_original_state_dict(model, sd)
    msg = str(info.value)
    assert "shape mismatches" in msg and "layer2s.0.0.conv1.weight -> experts.0.layer2.0.conv1.weight: checkpoint [24, 16, 3, 3] vs model [32, 16, 3, 3]" in msg
    assert "reduce_dimension" in msg

    sd = wrapped_state_dict(OrigCifarRIDE(2, use_norm=False), "backbone.")
    model = create_model("resnet32", num_classes=C + 1, num_experts=2)
    with pytest.raises(CheckpointMismatchError) as info:
        load_original_state_dict(model, sd)
    msg = str(info.value)
    assert "unexpected keys" in msg and "linears.0.bias -> heads.0.bias" in msg
    assert "use_norm=False" in msg and f"num_classes={C}" in msg


def test_missing_keys_are_named():
    sd = wrapped_state_dict(OrigCifarRIDE(2), "backbone.")
    del sd["backbone.layer1.2.bn2.running_var"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): trunk\.layer1\.2\.bn2\.running_var"):
        load_original_state_dict(create_model("resnet32", num_classes=C, num_experts=2), sd)


@torch.no_grad()
def test_convert_original_checkpoint_round_trip(tmp_path, monkeypatch):
    orig = randomise(OrigCifarRIDE(2), seed=4)
    # The original trainer pickles its config object (parse_config.ConfigParser), a class that
    # does not exist here: fake it while saving, remove it before converting.
    fake = types.ModuleType("parse_config")

    class ConfigParser:
        def __init__(self):
            self.config = {"arch": {"type": "ResNet32Model"}}

    ConfigParser.__module__, ConfigParser.__qualname__ = "parse_config", "ConfigParser"
    fake.ConfigParser = ConfigParser
    monkeypatch.setitem(sys.modules, "parse_config", fake)
    src = tmp_path / "orig" / "checkpoint-epoch200.pth"
    src.parent.mkdir()
    torch.save({"arch": "ResNet32Model", "epoch": 200, "state_dict": wrapped_state_dict(orig, "module.backbone."), "config": ConfigParser()}, src)
    monkeypatch.delitem(sys.modules, "parse_config")

    with pytest.warns(UserWarning, match=r"saves its config; this file: parse_config\.ConfigParser\), which torch\.load\(weights_only=True\) "
                      r"does not read\. Reading it") as caught:
        raw = load_checkpoint_file(src)
    assert "Error" not in str(caught[0].message) and "\x1b" not in str(caught[0].message)  # not torch's UnpicklingError text
    assert "unavailable parse_config.ConfigParser" in repr(raw["config"])  # stubbed, not imported

    dst = tmp_path / "out" / "ride_fast.pth"
    with pytest.warns(UserWarning, match="weights_only"):
        info = convert_original_checkpoint(src, dst, "resnet32", num_classes=C, num_experts=2)
    assert info["path"] == str(dst) and info["loaded"] > 0 and len(info["router_keys"]) == 4
    assert os.listdir(dst.parent) == [dst.name]  # no temporary file left behind

    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "model_args", "router"}
    assert ckpt["model_args"] == dict(name="resnet32", num_classes=C, num_experts=2, reduce_dimension=True, use_norm=True)
    model = create_model(**ckpt["model_args"]).eval()
    model.load_state_dict(ckpt["model"])
    torch.testing.assert_close(ckpt["router"]["expert_help_pred_fc.weight"], orig.expert_help_pred_fc.weight)
    x = _images(32, seed=4)
    torch.testing.assert_close(model(x).expert_logits, orig(x).transpose(0, 1), rtol=1e-4, atol=1e-4)


def test_convert_reports_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_original_checkpoint(tmp_path / "nope.pth", tmp_path / "out.pth", "resnet32", C, 2)
    notes = tmp_path / "notes.pth"
    notes.write_text("not weights\n")
    with pytest.raises(RuntimeError, match=r"notes\.pth is not a PyTorch checkpoint: it is a text file; expected a file "
                                           r"written by torch\.save, such as the original RIDE code's checkpoint-epochN\.pth"):
        convert_original_checkpoint(notes, tmp_path / "out.pth", "resnet32")
    cut = tmp_path / "cut.pth"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:700])
    with pytest.warns(UserWarning), pytest.raises(RuntimeError) as info:
        convert_original_checkpoint(cut, tmp_path / "out.pth", "resnet32")
    assert str(info.value) == (f"{cut}: cannot read this PyTorch checkpoint: a damaged or truncated torch.save archive "
                               "(a copy or a download that did not finish?)")
    src = tmp_path / "three.pth"
    torch.save({"state_dict": wrapped_state_dict(OrigCifarRIDE(3), "backbone.")}, src)
    with pytest.raises(CheckpointMismatchError, match=r"three\.pth: --num-experts asks for num_experts=2, but the checkpoint "
                                                      r"has num_experts=3 \(layer3s\.0\.\.2\); leave --num-experts out"):
        convert_original_checkpoint(src, tmp_path / "out.pth", "resnet32", C, 2)
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("experts,reduce,use_norm,single", [(3, True, True, False), (2, False, False, False), (1, True, True, True)],
                         ids=["ride3", "full_width_linear", "one_expert"])
def test_convert_reads_classes_experts_width_and_head_from_the_file(tmp_path, capsys, experts, reduce, use_norm, single):
    from ride_fast.cli import main

    orig = randomise(OrigCifarRIDE(experts, reduce=reduce, use_norm=use_norm, single=single), seed=6)
    src, dst = tmp_path / "orig.pth", tmp_path / "out.pt"
    torch.save({"state_dict": wrapped_state_dict(orig, "module.backbone.")}, src)
    assert main(["convert", str(src), str(dst), "--model", "resnet32"]) == 0
    args = dict(name="resnet32", num_classes=C, num_experts=experts, reduce_dimension=reduce, use_norm=use_norm)
    assert capsys.readouterr().out == f"wrote {dst}: " + ", ".join(f"{k}={v}" for k, v in args.items()) + "\n"
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["model_args"] == args
    model = create_model(**args).eval()
    model.load_state_dict(ckpt["model"])
    x = _images(32, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(x).expert_logits, orig(x).transpose(0, 1), rtol=1e-4, atol=1e-4)


def test_convert_flags_that_disagree_with_the_file_are_named(tmp_path, capsys):
    from ride_fast.cli import main

    src = tmp_path / "orig.pth"
    torch.save({"state_dict": wrapped_state_dict(randomise(OrigCifarRIDE(2), seed=7), "backbone.")}, src)
    dst = str(tmp_path / "out.pt")
    cases = {
        ("--num-classes", "100"): "--num-classes asks for num_classes=100, but the checkpoint has num_classes=10 "
                                  "(linears.0.weight [48, 10]); leave --num-classes out to take it from the file",
        ("--no-reduce-dimension",): "--[no-]reduce-dimension asks for reduce_dimension=False, but the checkpoint has "
                                    "reduce_dimension=True (feature width 48 of linears.0.weight [48, 10])",
        ("--linear",): "--linear asks for use_norm=False, but the checkpoint has use_norm=True (linears.0.weight without a bias)",
    }
    for flags, message in cases.items():
        assert main(["convert", str(src), dst, "--model", "resnet32", *flags]) == 2
        assert f"ride-fast convert: error: {src}: {message}" in capsys.readouterr().err
    agreeing = str(tmp_path / "agreeing.pt")
    assert main(["convert", str(src), agreeing, "--model", "resnet32", "--num-classes", "10", "--num-experts", "2"]) == 0
    with pytest.raises(SystemExit):
        main(["convert", str(src), dst, "--model", "resnet-32"])
    err = capsys.readouterr().err
    assert "argument --model: invalid choice: 'resnet-32'" in err and "resnet32" in err and "resnext50_32x4d" in err
    assert main(["convert", str(src), dst, "--model", "resnet10"]) == 2  # the wrong architecture
    assert ("the checkpoint's classifier linears.0.weight [48, 10] has feature width 48, but resnet10 has 384 (reduced) or "
            "512 (full width); is --model right?") in capsys.readouterr().err
    torch.save({"state_dict": {"backbone.conv1.weight": torch.ones(16, 3, 3, 3)}}, src)
    assert main(["convert", str(src), dst, "--model", "resnet32"]) == 2  # no expert stages at all
    assert ("no resnet32 weights: expected per-expert stages (layer2s.0, layer3s.0) and classifiers (linears.0.weight), "
            "or one expert's (linear.weight / fc.weight)") in capsys.readouterr().err


@pytest.mark.parametrize("case", ["hidden_width", "all_widths", "missing_bias", "foreign_key"])
def test_convert_refuses_router_weights_that_do_not_fit_the_network(tmp_path, capsys, case):
    """Router (stage 2) weights are checked at convert time, not when the converted file is first
    routed with; the error names the key and the shapes, and an existing DST stays as it was."""
    from ride_fast.cli import main

    sd = {k.removeprefix("module.backbone."): v for k, v in wrapped_state_dict(randomise(OrigCifarRIDE(3), seed=9), "module.backbone.").items()}
    if case == "hidden_width":
        sd["expert_help_pred_hidden_fcs.1.weight"] = torch.zeros(16, 32)
        message = "shape mismatches expert_help_pred_hidden_fcs.1.weight: checkpoint [16, 32] vs router [16, 48]"
    elif case == "all_widths":  # a router for other experts: it would rebuild, but not run on this network's features
        sd["expert_help_pred_hidden_fcs.0.weight"] = sd["expert_help_pred_hidden_fcs.1.weight"] = torch.zeros(16, 64)
        message = ("shape mismatches expert_help_pred_hidden_fcs.0.weight: checkpoint [16, 64] vs router [16, 48], "
                   "expert_help_pred_hidden_fcs.1.weight: checkpoint [16, 64] vs router [16, 48]")
    elif case == "missing_bias":
        del sd["expert_help_pred_fc.bias"]
        message = "missing expert_help_pred_fc.bias [1]"
    else:
        sd["expert_help_pred_gate.weight"] = torch.zeros(1, 16)
        message = "'expert_help_pred_gate.weight' is not a router weight of the original RIDE code"
    src, dst = tmp_path / "orig.pth", tmp_path / "out.pt"
    torch.save({"state_dict": sd}, src)
    dst.write_bytes(b"an earlier conversion")
    assert main(["convert", str(src), str(dst), "--model", "resnet32", "--overwrite"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"ride-fast convert: error: {src}: its router weights (stage 2) do not fit the network (3 experts, "
                          "feature width 48, 10 classes): ")
    assert message in err and "Traceback" not in err and "KeyError" not in err and out == ""
    assert dst.read_bytes() == b"an earlier conversion" and sorted(p.name for p in tmp_path.iterdir()) == ["orig.pth", "out.pt"]


def test_convert_keeps_router_weights_that_fit(tmp_path, capsys):
    from ride_fast.cli import main
    from ride_fast.engine.checkpoint import load_routed_checkpoint

    orig = randomise(OrigCifarRIDE(3), seed=9)
    src, dst = tmp_path / "orig.pth", tmp_path / "out.pt"
    torch.save({"state_dict": wrapped_state_dict(orig, "backbone.")}, src)
    assert main(["convert", str(src), str(dst), "--model", "resnet32"]) == 0
    net, router, _ = load_routed_checkpoint(dst)
    assert (router.num_experts, router.feature_dim, router.top_k) == (3, net.feature_dim, 5)


class _Evil:
    """An object whose unpickling would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_objects_in_a_checkpoint_never_run(tmp_path):
    orig = randomise(OrigCifarRIDE(2), seed=5)
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    torch.save({"state_dict": wrapped_state_dict(orig, "backbone."), "config": _Evil(marker)}, src)
    with pytest.warns(UserWarning, match="restricted unpickler"):
        info = convert_original_checkpoint(src, tmp_path / "out.pt", "resnet32", num_classes=C, num_experts=2)
    assert info["loaded"] > 0
    assert not marker.exists()


def test_convert_of_a_ride_fast_checkpoint_says_it_needs_no_conversion(tmp_path, capsys):
    from ride_fast.cli import main

    src = tmp_path / "best.pt"
    torch.save({"model": create_model("resnet32", num_classes=C, num_experts=2).state_dict(), "epoch": 3,
                "model_args": dict(name="resnet32", num_classes=C, num_experts=2)}, src)
    assert main(["convert", str(src), str(tmp_path / "out.pt"), "--model", "resnet32"]) == 2
    assert capsys.readouterr().err == (f"ride-fast convert: error: {src}: this is a ride_fast checkpoint already (it holds 'model' "
                                       "and 'model_args'), not the original code's: `ride-fast eval --checkpoint` and "
                                       "`ride-fast route --checkpoint` read it as it is\n")
    assert not (tmp_path / "out.pt").exists()


def test_convert_never_writes_over_its_source_nor_an_existing_file_unless_asked(tmp_path, capsys):
    from ride_fast.cli import main

    src = tmp_path / "orig.pth"
    torch.save({"state_dict": wrapped_state_dict(randomise(OrigCifarRIDE(2), seed=8), "backbone.")}, src)
    original = src.read_bytes()
    for dst in (str(src), f"{tmp_path}/./orig.pth"):
        for extra in ([], ["--overwrite"]):
            assert main(["convert", str(src), dst, "--model", "resnet32", *extra]) == 2
            assert capsys.readouterr().err == (f"ride-fast convert: error: {dst} is the file to convert; give another "
                                               "destination (the original stays as it is)\n")
    assert src.read_bytes() == original
    trained = tmp_path / "best.pt"
    trained.write_bytes(b"a training checkpoint")
    assert main(["convert", str(src), str(trained), "--model", "resnet32"]) == 2
    assert capsys.readouterr().err == (f"ride-fast convert: error: {trained} exists already; choose another destination, "
                                       "or pass --overwrite to replace it\n")
    assert trained.read_bytes() == b"a training checkpoint"
    assert main(["convert", str(src), str(trained), "--model", "resnet32", "--overwrite"]) == 0
    assert torch.load(trained, weights_only=True)["model_args"]["num_experts"] == 2
