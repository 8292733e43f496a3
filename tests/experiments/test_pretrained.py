"""The real pretrained CIFAR-10 ResNet-20 ($FASTEDIT_MODELS) on the 1,017 exact test images."""
import numpy as np
import pytest
import torch

import fastedit as fe
from fastedit.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10_lossless, to_float_tensor
from fastedit.models import load_pretrained_cifar_resnet


@pytest.fixture(scope="module")
def resnet20_and_data(shared_models_dir, shared_data_dir):
    ckpt = shared_models_dir / "resnet20-12fca82f.th"
    npz = shared_data_dir / "cifar10" / "cifar10_lossless_subset.npz"
    if not ckpt.exists() or not npz.exists():
        pytest.skip(f"need {ckpt} and {npz}")
    model = load_pretrained_cifar_resnet(ckpt)
    x, y = load_cifar10_lossless(npz, split="test")
    return model, to_float_tensor(x, CIFAR10_MEAN, CIFAR10_STD), y


def test_pretrained_resnet20_accuracy(resnet20_and_data):
    model, x, y = resnet20_and_data
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 256]).argmax(-1) for i in range(0, x.shape[0], 256)])
    acc = (pred == y).double().mean().item()
    assert x.shape[0] == 1017 and acc >= 0.91, acc


def test_twenty_layer3_rmsprop_edits_succeed(resnet20_and_data):
    model, x, y = resnet20_and_data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(x.shape[0], generator=gen)[:20]
    labels = torch.randint(0, 10, (20,), generator=gen)
    steps = []
    for i, label in zip(idx.tolist(), labels.tolist()):
        r = fe.edit(model, x[i:i + 1], label, editor=fe.RMSProp(1e-3), params="layer3", max_steps=10)
        assert r.success and r.steps <= 10, (i, label, r)
        with torch.no_grad():
            assert model(x[i:i + 1]).argmax(-1).item() == label
        steps.append(r.steps)
        r.revert()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    print(f"steps per edit: {steps}, mean {np.mean(steps):.2f}")
