"""The frozen-prefix split on every bundled model: exact outputs and functional gradients."""
import pytest
import torch
from torch.func import functional_call, grad

from fastedit.models import get_model
from fastedit.prefix import split_prefix

CASES = [  # (model, input shape, editable prefixes)
    ("resnet20", (3, 3, 32, 32), ["layer3", "layer1", "linear", "conv1", "layer2.1.bn2"]),
    ("resnet32", (2, 3, 32, 32), ["layer3"]),
    ("resnet44", (2, 3, 32, 32), ["layer2"]),
    ("resnet56", (2, 3, 32, 32), ["layer3.8"]),
    ("resnet18", (2, 3, 32, 32), ["layer3", "layer4", "layer1", "linear"]),
    ("small_cnn", (3, 1, 8, 8), ["head", "classifier", "features"]),
    ("mlp", (3, 1, 8, 8), ["classifier", "features"]),
]


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("name,shape,selections", CASES, ids=[c[0] for c in CASES])
def test_split_exact_on_bundled_models(name, shape, selections):
    model = get_model(name).double().eval()
    _randomise_bn(model)
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
    for prefix in selections:
        names = [n for n, _ in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
        split = split_prefix(model, names)
        assert split.traced, (name, prefix, split.reason)
        with torch.no_grad():
            acts = split.prefix(x)
            assert torch.equal(split.suffix(acts), full), (name, prefix)
        params = {n: p.detach() for n, p in model.named_parameters() if n in names}
        loss_split = lambda p: functional_call(split.suffix_module, p, (acts,)).logsumexp(-1).sum()  # noqa: E731
        loss_full = lambda p: functional_call(model, p, (x,)).logsumexp(-1).sum()  # noqa: E731
        g_split, g_full = grad(loss_split)(params), grad(loss_full)(params)
        for n in names:
            torch.testing.assert_close(g_split[n], g_full[n], rtol=1e-10, atol=1e-12)
