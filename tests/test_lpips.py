"""LPIPS-VGG: parity with an independent torch build of lpips v0.1, the importer's strictness."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from keyface_jax.conversion.torch_pickle import CheckpointError
from keyface_jax.losses.lpips import LPIPS
from keyface_jax.losses.lpips_import import (load_lpips, lpips_from_state_dicts,
                                             split_lpips_module_state_dict)

torch = pytest.importorskip("torch")
tnn = torch.nn

VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]  # lpips' slice1..slice5 of vgg16.features


class TorchLPIPS(tnn.Module):
    """lpips.LPIPS(net="vgg", version="0.1") rebuilt from torch.nn layers with the same module
    names, so its state_dict() has the real module's keys (spec §9.8's 38)."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = tnn.Module()
        for name, value in (("shift", [-.030, -.088, -.188]), ("scale", [.458, .448, .450])):
            self.scaling_layer.register_buffer(name, torch.tensor(value)[None, :, None, None])
        features, cin = [], 3
        for v in VGG_CFG:
            if v == "M":
                features.append(tnn.MaxPool2d(kernel_size=2, stride=2))
            else:
                features += [tnn.Conv2d(cin, v, 3, padding=1), tnn.ReLU(inplace=False)]
                cin = v
        self.net = tnn.Module()
        for k, (a, b) in enumerate(SLICES):
            s = tnn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), features[i])
            setattr(self.net, f"slice{k + 1}", s)
        lins = []
        for k, ch in enumerate([64, 128, 256, 512, 512]):
            lin = tnn.Module()
            lin.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(ch, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
            lins.append(lin)
        self.lins = tnn.ModuleList(lins)

    def forward(self, in0, in1):
        sl = self.scaling_layer
        h0, h1 = (in0 - sl.shift) / sl.scale, (in1 - sl.shift) / sl.scale
        val = 0
        for k in range(5):
            h0, h1 = getattr(self.net, f"slice{k + 1}")(h0), getattr(self.net, f"slice{k + 1}")(h1)
            f0 = h0 / (torch.sqrt(torch.sum(h0**2, dim=1, keepdim=True)) + 1e-10)
            f1 = h1 / (torch.sqrt(torch.sum(h1**2, dim=1, keepdim=True)) + 1e-10)
            val = val + self.lins[k].model((f0 - f1) ** 2).mean([2, 3], keepdim=True)
        return val


@pytest.fixture(scope="module")
def torch_lpips():
    torch.manual_seed(0)
    model = TorchLPIPS().eval()
    with torch.no_grad():  # LPIPS lin weights are non-negative; exercise that regime
        for lin in model.lins:
            lin.model[1].weight.abs_()
    return model


def _published_files(model, folder, classifier=True):
    """Split the module's weights into the two published files' naming and torch.save them."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    vgg = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v for k, v in sd.items()
           if k.startswith("net.")}
    if classifier:  # torchvision's file also has the ImageNet head
        vgg["classifier.0.weight"] = torch.zeros(8, 4)
        vgg["classifier.6.bias"] = torch.zeros(3)
    lin = {k: v for k, v in sd.items() if k.startswith("lin") and not k.startswith("lins")}
    paths = os.path.join(folder, "vgg16.pth"), os.path.join(folder, "vgg.pth")
    torch.save(vgg, paths[0])
    torch.save(lin, paths[1])
    return paths, vgg, lin


_GRAPHDEF = nnx.graphdef(nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0))))


@jax.jit
def _lpips_call(state, x0, x1):
    return nnx.merge(_GRAPHDEF, state)(x0, x1)


def _nhwc(t):
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def test_parity_with_torch_lpips_through_weight_files(torch_lpips, tmp_path):
    (vgg_path, lin_path), _, _ = _published_files(torch_lpips, tmp_path)
    module = load_lpips(vgg_path, lin_path)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 48, 40, generator=g) * 2 - 1
    x1 = (x0 + 0.3 * torch.randn(3, 3, 48, 40, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        expect = torch_lpips(x0, x1).reshape(-1).numpy()
    state = nnx.state(module)
    got = np.asarray(_lpips_call(state, _nhwc(x0), _nhwc(x1)))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7)
    assert np.all(expect > 1e-3)  # a non-trivial comparison
    # LPIPS(x, x) = 0 (up to XLA computing the two halves of the joint batch in another order).
    same = np.asarray(_lpips_call(state, _nhwc(x0), _nhwc(x0)))
    np.testing.assert_allclose(same, 0.0, atol=1e-12)


def test_lpips_module_state_dict_split(torch_lpips):
    sd = {f"loss_fn.lpips.{k}": v.numpy() for k, v in torch_lpips.state_dict().items()}
    assert len(sd) == 38  # 26 conv + 5 lin + 5 lins + 2 scaling buffers (spec §9.8)
    sd["model.diffusion_model.out.2.weight"] = np.zeros(1)  # outside the prefix: ignored
    vgg, lin = split_lpips_module_state_dict(sd, prefix="loss_fn.lpips.", source="keyframe.pt")
    module = lpips_from_state_dicts(vgg, lin)
    k = "features.28.bias"
    np.testing.assert_array_equal(np.asarray(module.features[28].bias[...]), vgg[k])
    np.testing.assert_array_equal(np.asarray(module.lin3.model[1].kernel[...]).reshape(-1),
                                  lin["lin3.model.1.weight"].reshape(-1))
    bad = dict(sd, **{"loss_fn.lpips.scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)})
    with pytest.raises(CheckpointError, match="scaling_layer.shift"):
        split_lpips_module_state_dict(bad, prefix="loss_fn.lpips.", source="keyframe.pt")


def test_importer_errors_name_file_and_keys(torch_lpips, tmp_path):
    (vgg_path, lin_path), vgg, lin = _published_files(torch_lpips, tmp_path)
    # Missing key.
    missing = {k: v for k, v in vgg.items() if k != "features.28.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError) as err:
        load_lpips(tmp_path / "missing.pth", lin_path)
    assert "missing.pth" in str(err.value) and "features.28.bias" in str(err.value)
    assert "missing keys" in str(err.value)
    # Wrong shape, in the lin file.
    wrong = dict(lin, **{"lin2.model.1.weight": torch.zeros(1, 128, 1, 1)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError) as err:
        load_lpips(vgg_path, tmp_path / "wrong.pth")
    msg = str(err.value)
    assert "wrong.pth" in msg and "lin2.model.1.weight" in msg and "(1, 256, 1, 1)" in msg
    # Unexpected key (e.g. a lin file saved without the dropout layer's index).
    renamed = {k.replace("model.1", "model.0"): v for k, v in lin.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match="(?s)unexpected keys.*lin0.model.0.weight"):
        load_lpips(vgg_path, tmp_path / "renamed.pth")
    # Nonexistent file, and no path at all.
    with pytest.raises(CheckpointError, match="nope/vgg16.pth: no such file"):
        load_lpips(tmp_path / "nope" / "vgg16.pth", lin_path)
    with pytest.raises(CheckpointError, match="no file given"):
        load_lpips(vgg_path, "")


def test_gradient_is_finite_with_dead_features():
    """All-zero ReLU features (zero weights) make sqrt'(0) infinite; input gradients stay finite."""
    module = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), state)
    x = jnp.zeros((1, 16, 16, 3))
    grad = jax.jit(jax.grad(lambda x: nnx.merge(graphdef, state)(x, jnp.ones_like(x)).sum()))(x)
    assert np.all(np.isfinite(np.asarray(grad)))
