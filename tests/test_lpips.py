"""LPIPS in plain torch: against a step-by-step computation, torchvision's key names, DIV over prompt groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastsd.errors import ModelFormatError
from fastsd.eval.lpips import LPIPS, image_tensor, load_lpips, within_group_lpips

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: torchvision's AlexNet ``features`` parameters: key -> shape (the published file's names).
TORCHVISION_FEATURES = {
    "features.0.weight": (64, 3, 11, 11),
    "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5),
    "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3),
    "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3),
    "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3),
    "features.10.bias": (256,),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from fastsd.demo.tiny_scorers import build_tiny_lpips

    folder = build_tiny_lpips(tmp_path_factory.mktemp("lpips"))
    alex = torch.load(folder / "alexnet-owt-7be5be79.pth", weights_only=True)
    lin = torch.load(folder / "alex.pth", weights_only=True)
    return folder, alex, lin


def _direct(alex, lin, x, y):
    """LPIPS v0.1 alex written out op by op, from the state dicts (lpips' forward, torchvision's AlexNet)."""

    def taps(img):
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        h = (img - shift) / scale
        h = F.relu(F.conv2d(h, alex["features.0.weight"], alex["features.0.bias"], stride=4, padding=2))
        relu1 = h
        h = F.max_pool2d(h, 3, 2)
        h = F.relu(F.conv2d(h, alex["features.3.weight"], alex["features.3.bias"], padding=2))
        relu2 = h
        h = F.max_pool2d(h, 3, 2)
        relu3 = h = F.relu(F.conv2d(h, alex["features.6.weight"], alex["features.6.bias"], padding=1))
        relu4 = h = F.relu(F.conv2d(h, alex["features.8.weight"], alex["features.8.bias"], padding=1))
        relu5 = F.relu(F.conv2d(h, alex["features.10.weight"], alex["features.10.bias"], padding=1))
        return [relu1, relu2, relu3, relu4, relu5]

    total = torch.zeros(len(x), dtype=torch.float64)
    for k, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        a = a.double() / (torch.sqrt((a.double() ** 2).sum(dim=1, keepdim=True)) + 1e-10)
        b = b.double() / (torch.sqrt((b.double() ** 2).sum(dim=1, keepdim=True)) + 1e-10)
        w = lin[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(dim=1).mean(dim=(1, 2))  # the 1x1 conv, then the spatial average
    return total


def test_lpips_matches_a_step_by_step_computation(weights):
    folder, alex, lin = weights
    model = load_lpips(folder)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    got = model(x, y)
    assert got.shape == (3,)
    assert torch.allclose(got.double(), _direct(alex, lin, x, y), rtol=1e-4, atol=1e-7)
    assert (got > 0).all()
    assert torch.allclose(model(y, x), got, rtol=1e-5)  # symmetric
    assert torch.equal(model(x, x), torch.zeros(3))  # identical images are at 0


def test_torchvision_key_names_load_and_other_keys_are_ignored(weights, tmp_path):
    folder, alex, lin = weights
    assert {k: tuple(v.shape) for k, v in alex.items()} == TORCHVISION_FEATURES
    with_classifier = {**alex, "classifier.1.weight": torch.zeros(4, 9), "classifier.6.bias": torch.zeros(4)}
    torch.save(with_classifier, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(lin, tmp_path / "alex.pth")
    model = load_lpips(tmp_path)
    assert torch.equal(model.features[10].weight, alex["features.10.weight"])
    assert torch.equal(model.lin[4].weight, lin["lin4.model.1.weight"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_wrong_or_missing_weights_are_refused(weights, tmp_path):
    _, alex, lin = weights
    torch.save(lin, tmp_path / "alex.pth")
    with pytest.raises(ModelFormatError, match="alexnet-owt-7be5be79.pth"):
        load_lpips(tmp_path)  # only the linear layers
    torch.save({**alex, "features.3.weight": torch.zeros(192, 64, 3, 3)}, tmp_path / "alexnet.pth")
    with pytest.raises(ModelFormatError, match="not torchvision's AlexNet"):
        load_lpips(tmp_path)  # a shape that is not AlexNet's
    torch.save(alex, tmp_path / "alexnet.pth")
    torch.save({k: v for k, v in lin.items() if not k.startswith("lin3")}, tmp_path / "alex.pth")
    with pytest.raises(ModelFormatError, match="lin3.model.1.weight"):
        load_lpips(tmp_path)


def test_within_group_lpips_is_the_mean_over_pairs_of_each_prompt(weights):
    folder, _, _ = weights
    model = load_lpips(folder)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 40)]
    ims = []
    for i, rgb in enumerate(colours):
        im = Image.new("RGB", (48, 48), rgb)
        im.paste((255 - 60 * i, 255, 0), (8 * i, 8, 8 * i + 16, 30))
        ims.append(im)
    t = image_tensor(ims)
    assert t.shape == (4, 3, 48, 48) and t.min() >= -1 and t.max() <= 1
    assert t[0, :, 0, 0].tolist() == pytest.approx([200 / 127.5 - 1, 30 / 127.5 - 1, 30 / 127.5 - 1])

    def d(i, j):
        return float(model(t[i : i + 1], t[j : j + 1])[0])

    group_a = (d(0, 1) + d(0, 2) + d(1, 2)) / 3
    three = within_group_lpips(model, ims[:3], 3)
    assert three == pytest.approx(group_a, rel=1e-5)
    two_groups = within_group_lpips(model, ims, 2)  # prompts (0, 1) and (2, 3)
    assert two_groups == pytest.approx((d(0, 1) + d(2, 3)) / 2, rel=1e-5)
    assert within_group_lpips(model, [ims[0], ims[0]], 2) == 0.0
    with pytest.raises(ValueError, match="groups"):
        within_group_lpips(model, ims[:3], 2)


def test_the_module_keys_are_torchvisions_features_and_five_lins():
    model = LPIPS()
    keys = set(model.state_dict())  # the scaling constants are buffers outside the state dict
    assert keys == {*(k for k in TORCHVISION_FEATURES), *(f"lin.{k}.weight" for k in range(5))}
