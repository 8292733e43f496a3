"""Tests for fastedit.models: architectures, parameter counts, fx traceability, checkpoints."""
import copy

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from fastedit.models import (
    CIFAR_MEAN,
    CIFAR_STD,
    MLP,
    MODEL_NAMES,
    BasicBlockA,
    CifarResNet,
    PadShortcut,
    ResNet18Cifar,
    SmallCNN,
    cifar_resnet,
    get_model,
    load_pretrained_cifar_resnet,
    read_state_dict,
    resnet18_cifar,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
)

CHECKPOINTS = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}
# Accuracy on the 1,017 exact CIFAR-10 test images (measured: 932, 944, 950, 943 correct =
# 91.64 / 92.82 / 93.41 / 92.72 %). Thresholds leave a margin of a few images.
MIN_ACCURACY = {20: 0.91, 32: 0.92, 44: 0.93, 56: 0.92}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sample_input(name: str, n: int = 2) -> torch.Tensor:
    if name == "small_cnn":
        return torch.randn(n, 1, 8, 8)
    if name == "mlp":
        return torch.randn(n, 64)
    return torch.randn(n, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# parameter counts, derived by hand from the architecture


def cifar_resnet_param_count(n: int) -> int:
    """Hand count for the CIFAR ResNet with n blocks per stage (depth 6n + 2).

    conv3x3 weight = c_in * c_out * 9 (no bias); BN = 2 * c (weight, bias); option A adds nothing.
      stem:    conv 3*16*9 = 432, bn 32                                   ->    464
      layer1:  per block 2 * 16*16*9 = 4608 + 2 BN * 32 = 64              ->  4,672 per block
      layer2:  first block 16*32*9 + 32*32*9 = 4608 + 9216 = 13,824 + 128 -> 13,952
               other blocks 2 * 9216 + 128                                -> 18,560 each
      layer3:  first block 32*64*9 + 64*64*9 = 18,432 + 36,864 + 256      -> 55,552
               other blocks 2 * 36,864 + 256                              -> 73,984 each
      linear:  64*10 + 10                                                 ->    650
    ResNet-20 (n=3): 464 + 3*4,672 + 13,952 + 2*18,560 + 55,552 + 2*73,984 + 650
                   = 464 + 14,016 + 51,072 + 203,520 + 650 = 269,722.
    """
    return 464 + n * 4672 + 13952 + (n - 1) * 18560 + 55552 + (n - 1) * 73984 + 650


def test_cifar_resnet_param_counts():
    assert cifar_resnet_param_count(3) == 269_722
    assert n_params(resnet20()) == 269_722  # "0.27M"
    assert n_params(resnet32()) == cifar_resnet_param_count(5) == 464_154  # "0.46M"
    assert n_params(resnet44()) == cifar_resnet_param_count(7) == 658_586  # "0.66M"
    assert n_params(resnet56()) == cifar_resnet_param_count(9) == 853_018  # "0.85M"
    assert n_params(cifar_resnet(110)) == cifar_resnet_param_count(18)  # "1.7M"


def test_resnet18_param_count():
    """Hand count for the CIFAR ResNet-18 (10 classes), option-B shortcuts (1x1 conv + BN).

      stem:   3*64*9 = 1,728 + BN 128                                             ->     1,856
      layer1: 2 blocks * (2 * 64*64*9 = 73,728 + 2 BN * 128 = 256)                ->   147,968
      layer2: 64*128*9 + 128*128*9 + 2*256 + shortcut 64*128 + 256 = 230,144;
              + second block 2*147,456 + 512 = 295,424                            ->   525,568
      layer3: 128*256*9 + 256*256*9 + 1,024 + 128*256 + 512 = 919,040;
              + 2*589,824 + 1,024 = 1,180,672                                     -> 2,099,712
      layer4: 256*512*9 + 512*512*9 + 2,048 + 256*512 + 1,024 = 3,673,088;
              + 2*2,359,296 + 2,048 = 4,720,640                                   -> 8,393,728
      linear: 512*10 + 10                                                         ->     5,130
    total 11,173,962 ("11.17M").
    """
    expected = 1856 + 147_968 + 525_568 + 2_099_712 + 8_393_728 + 5130
    assert expected == 11_173_962
    assert n_params(resnet18_cifar()) == expected
    assert n_params(resnet18_cifar(num_classes=100)) == expected - 5130 + 512 * 100 + 100


def test_small_model_param_counts():
    # SmallCNN(w=32): conv 1*32*9=288 + BN 64 + conv 32*64*9=18,432 + BN 128
    #                 + head (64*2*2=256)*64+64 = 16,448 + classifier 64*10+10 = 650 -> 36,010
    assert n_params(SmallCNN()) == 288 + 64 + 18_432 + 128 + 16_448 + 650
    # MLP(64, 128, 10): 64*128+128 + 128*10+10 = 9,610
    assert n_params(MLP(64, 128, 10)) == 9_610
    assert n_params(MLP(64, [32, 16], 3)) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 3 + 3


# ---------------------------------------------------------------------------------------------
# shapes and fx


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape(name):
    model = get_model(name).eval()
    with torch.no_grad():
        assert model(sample_input(name)).shape == (2, 10)
    model = get_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(sample_input(name)).shape == (2, 7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fx_trace_matches_eager(name):
    model = get_model(name)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    x = sample_input(name, 4)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    # the traced graph calls the submodules by their names (needed to split at e.g. "layer3")
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    if name.startswith("resnet"):
        assert {"conv1", "bn1", "linear"} <= targets
        assert any(str(t).startswith("layer3.") for t in targets)
    if name == "small_cnn":
        assert {"head", "classifier"} <= targets


def test_fx_trace_matches_eager_in_train_mode():
    model = resnet20().train()
    twin = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(twin)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(traced(x), model(x))
    for a, b in zip(model.buffers(), traced.buffers()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# option-A shortcut


def test_pad_shortcut_exact():
    sc = PadShortcut(pad=8)
    assert list(sc.parameters()) == [] and list(sc.buffers()) == []
    for hw in (32, 7):
        x = torch.randn(3, 16, hw, hw)
        out = sc(x)
        half = (hw + 1) // 2
        assert out.shape == (3, 32, half, half)
        assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8]))
        assert torch.equal(out[:, 24:], torch.zeros_like(out[:, 24:]))
        assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
        # exact zeros, not negative zeros or tiny values
        assert (out[:, :8] == 0).all() and not torch.signbit(out[:, :8]).any()


def test_option_a_shortcut_in_model():
    model = resnet20()
    for stage, (cin, cout) in (("layer2", (16, 32)), ("layer3", (32, 64))):
        sc = getattr(model, stage)[0].shortcut
        assert isinstance(sc, PadShortcut) and sc.pad == cout // 4 and sc.stride == 2
        for block in getattr(model, stage)[1:]:
            assert isinstance(block.shortcut, nn.Identity)
    for block in model.layer1:
        assert isinstance(block.shortcut, nn.Identity)
    assert [m for m in model.modules() if isinstance(m, nn.MaxPool2d)] == []


def test_basic_block_a_by_hand():
    block = BasicBlockA(16, 32, stride=2).eval()
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        h = torch.relu(block.bn1(block.conv1(x)))
        h = block.bn2(block.conv2(h))
        shortcut = torch.cat([torch.zeros(2, 8, 8, 8), x[:, :, ::2, ::2], torch.zeros(2, 8, 8, 8)], 1)
        assert torch.equal(block(x), torch.relu(h + shortcut))
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert block.conv1.bias is None and block.conv2.bias is None


# ---------------------------------------------------------------------------------------------
# architecture details, names


def expected_cifar_keys(n: int) -> list[str]:
    bn = ["weight", "bias", "running_mean", "running_var"]
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    for stage in (1, 2, 3):
        for i in range(n):
            p = f"layer{stage}.{i}"
            keys += [f"{p}.conv1.weight"] + [f"{p}.bn1.{s}" for s in bn]
            keys += [f"{p}.conv2.weight"] + [f"{p}.bn2.{s}" for s in bn]
    return keys + ["linear.weight", "linear.bias"]


def model_keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_cifar_resnet_key_names(depth):
    assert model_keys(cifar_resnet(depth)) == expected_cifar_keys((depth - 2) // 6)


@pytest.mark.parametrize("depth", sorted(CHECKPOINTS))
def test_key_names_match_real_checkpoint(depth, shared_models_dir):
    raw = torch.load(shared_models_dir / CHECKPOINTS[depth], map_location="cpu", weights_only=True)
    stripped = [k.removeprefix("module.") for k in raw["state_dict"]]
    model = cifar_resnet(depth)
    assert model_keys(model) == stripped
    shapes = {k.removeprefix("module."): v.shape for k, v in raw["state_dict"].items()}
    assert all(v.shape == shapes[k] for k, v in model.state_dict().items() if k in shapes)


def test_cifar_resnet_bad_depth():
    for depth in (0, 2, 19, 21, 18.0, "20"):
        with pytest.raises(ValueError, match="6n"):
            cifar_resnet(depth)


def test_kaiming_init():
    torch.manual_seed(1)
    model = resnet56()
    w = model.layer3[5].conv2.weight  # fan_in 64*9 = 576
    assert abs(w.std().item() / (2 / 576) ** 0.5 - 1) < 0.03
    assert torch.equal(model.bn1.weight, torch.ones(16)) and torch.equal(model.bn1.bias, torch.zeros(16))
    assert (resnet20().conv1.weight != resnet20().conv1.weight).any()  # random, not constant


def test_resnet18_structure():
    model = resnet18_cifar()
    assert isinstance(model, ResNet18Cifar)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert [m for m in model.modules() if isinstance(m, nn.MaxPool2d)] == []
    for k, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
        stage = getattr(model, f"layer{k}")
        assert len(stage) == 2
        first = stage[0]
        assert first.conv1.out_channels == planes and first.conv1.stride == (stride, stride)
        if k == 1:
            assert isinstance(first.shortcut, nn.Identity)
        else:
            conv, bn = first.shortcut
            assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
            assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == planes
        assert isinstance(stage[1].shortcut, nn.Identity)
    assert model.linear.in_features == 512
    # the paper's chains
    names = {n for n, _ in model.named_children()}
    assert {"layer1", "layer2", "layer3", "layer4"} <= names
    # feature map sizes 32, 16, 8, 4
    x = torch.randn(1, 3, 32, 32)
    sizes = []
    model.eval()
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        for k in range(1, 5):
            h = getattr(model, f"layer{k}")(h)
            sizes.append(h.shape[-1])
    assert sizes == [32, 16, 8, 4]


def test_small_models():
    cnn = SmallCNN().eval()
    assert isinstance(cnn.features, nn.Sequential)
    assert cnn.head.out_features == cnn.classifier.in_features
    names = [n for n, _ in cnn.named_parameters()]
    assert [n for n in names if n.startswith("classifier")] == ["classifier.weight", "classifier.bias"]
    assert [n for n in names if n.startswith("head")] == ["head.weight", "head.bias"]
    with torch.no_grad():
        assert cnn(torch.randn(3, 1, 8, 8)).shape == (3, 10)
        assert cnn(torch.randn(3, 1, 28, 28)).shape == (3, 10)
        assert SmallCNN(in_channels=3, pool_size=1).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    mlp = MLP(64, 32, 10)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(mlp(x), mlp(x.flatten(1)))
    assert [n for n, _ in mlp.named_parameters()][-2:] == ["classifier.weight", "classifier.bias"]
    with pytest.raises(ValueError):
        SmallCNN(width=0)
    with pytest.raises(ValueError):
        MLP(64, [32, 0], 10)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _fake_checkpoint(depth: int, prefix: str = "module.") -> dict:
    model = cifar_resnet(depth)
    state = {prefix + k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return {"state_dict": state, "best_prec1": 12.5}, model


@pytest.mark.slow
def test_loader_roundtrip_and_depth_inference(tmp_path):
    ckpt, ref = _fake_checkpoint(32)
    named = tmp_path / "resnet32-deadbeef.th"
    anonymous = tmp_path / "weights.pt"
    plain = tmp_path / "plain.pt"
    torch.save(ckpt, named)
    torch.save(ckpt, anonymous)
    torch.save(ref.state_dict(), plain)  # plain state dict, no prefix, with num_batches_tracked
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.eval()(x)
        for source in (named, str(anonymous), plain, ckpt, ckpt["state_dict"]):
            model = load_pretrained_cifar_resnet(source)
            assert isinstance(model, CifarResNet) and model.depth == 32 and not model.training
            assert torch.equal(model(x), want)
        assert load_pretrained_cifar_resnet(named, depth=32).depth == 32


def test_loader_errors(tmp_path):
    ckpt, _ = _fake_checkpoint(20)
    path = tmp_path / "resnet20-0000.th"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="ResNet-20, not the requested ResNet-56"):
        load_pretrained_cifar_resnet(path, depth=56)
    renamed = tmp_path / "resnet44-0000.th"
    torch.save(ckpt, renamed)
    with pytest.raises(ValueError, match="file name says ResNet-44"):
        load_pretrained_cifar_resnet(renamed)
    with pytest.raises(FileNotFoundError):
        load_pretrained_cifar_resnet(tmp_path / "nope.th")
    text = tmp_path / "resnet20-text.th"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_pretrained_cifar_resnet(text)
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ValueError, match="not a state dict"):
        load_pretrained_cifar_resnet(tensor_file)
    r18 = tmp_path / "r18.pt"
    torch.save(resnet18_cifar().state_dict(), r18)
    with pytest.raises(ValueError, match="does not fit|not a CIFAR ResNet"):
        load_pretrained_cifar_resnet(r18)
    broken = dict(ckpt["state_dict"])
    del broken["module.layer2.1.bn2.running_var"]
    with pytest.raises(ValueError, match="missing keys.*layer2.1.bn2.running_var"):
        load_pretrained_cifar_resnet(broken)
    bad_shape = dict(ckpt["state_dict"])
    bad_shape["module.layer1.0.conv1.weight"] = torch.zeros(16, 16, 1, 1)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained_cifar_resnet(bad_shape)
    with pytest.raises(ValueError, match="empty"):
        load_pretrained_cifar_resnet({})


def test_read_state_dict_strips_module(tmp_path):
    ckpt, _ = _fake_checkpoint(20)
    sd = read_state_dict(ckpt)
    assert all(not k.startswith("module.") for k in sd) and "linear.weight" in sd


@pytest.fixture(scope="module")
def cifar_test_subset(shared_data_dir):
    path = shared_data_dir / "cifar10" / "cifar10_lossless_subset.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with np.load(path) as data:
        x = torch.from_numpy(data["x_test"]).permute(0, 3, 1, 2).float().div(255)
        y = torch.from_numpy(data["y_test"]).long()
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert x.shape == (1017, 3, 32, 32) and y.shape == (1017,)
    return (x - mean) / std, y


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


@pytest.mark.slow
@pytest.mark.parametrize("depth", sorted(CHECKPOINTS))
def test_pretrained_accuracy(depth, shared_models_dir, cifar_test_subset):
    path = shared_models_dir / CHECKPOINTS[depth]
    if not path.is_file():
        pytest.skip(f"{path} not found")
    model = load_pretrained_cifar_resnet(path)
    assert model.depth == depth and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    x, y = cifar_test_subset
    acc = _accuracy(model, x, y)
    assert acc >= MIN_ACCURACY[depth], f"resnet{depth}: accuracy {acc:.4f}"
    if depth == 20:  # the traced model gives bit-identical logits on real data
        traced = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            assert torch.equal(traced(x[:64]), model(x[:64]))


# ---------------------------------------------------------------------------------------------
# registry


def test_model_names():
    assert set(MODEL_NAMES) == {"resnet20", "resnet32", "resnet44", "resnet56", "resnet18", "small_cnn", "mlp"}
    assert isinstance(get_model("resnet18"), ResNet18Cifar)
    assert isinstance(get_model("small_cnn", width=8), SmallCNN)
    assert isinstance(get_model("mlp", in_features=10, hidden=[4]), MLP)
    assert get_model("RESNET44").depth == 44


def test_get_model_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet20"):
        get_model("resnet19")


def test_get_model_weights_small(tmp_path):
    src = SmallCNN(width=8)
    path = tmp_path / "cnn.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    model = get_model("small_cnn", weights=path, width=8)
    assert not model.training
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), src.eval()(x))
    with pytest.raises(ValueError, match="does not fit"):
        get_model("small_cnn", weights=path, width=16)
    with pytest.raises(ValueError, match="does not fit"):
        get_model("mlp", weights=path)


def test_get_model_wrong_cifar_checkpoint(tmp_path):
    ckpt, _ = _fake_checkpoint(20)
    path = tmp_path / "resnet20-x.th"
    torch.save(ckpt, path)
    assert get_model("resnet20", weights=path).depth == 20
    with pytest.raises(ValueError, match="not the requested ResNet-32"):
        get_model("resnet32", weights=path)
    with pytest.raises(ValueError, match="classes"):
        get_model("resnet20", num_classes=100, weights=path)
    with pytest.raises(ValueError, match="does not fit"):
        get_model("resnet18", weights=path)


def test_get_model_real_checkpoint(shared_models_dir):
    path = shared_models_dir / CHECKPOINTS[20]
    if not path.is_file():
        pytest.skip(f"{path} not found")
    model = get_model("resnet20", weights=path)
    assert isinstance(model, CifarResNet) and model.depth == 20 and not model.training
    with pytest.raises(ValueError, match="ResNet-20, not the requested ResNet-56"):
        get_model("resnet56", weights=path)
