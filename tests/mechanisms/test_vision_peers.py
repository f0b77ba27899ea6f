"""Numerical cross-checks of cbam, gcnet and nonlocal against timm's modules (``timm==1.0.31``), with the
weights copied over; skipped when timm is not installed.

Where timm's defaults differ from the papers (and from fastattn's defaults), the timm module is built in
the paper's configuration:

* ``CbamModule``: ``mlp_bias=False`` by default (the authors' MLP has biases: ``mlp_bias=True`` here);
  its spatial gate is conv + BatchNorm (fastattn ``spatial_bn=True``); channel maps ``[mean; max]``, the
  same order as fastattn (the authors' code has ``[max; mean]``).
* ``GlobalContext``: defaults ``fuse_scale=True, fuse_add=False, rd_ratio=1/8``; the paper's block is
  ``fuse_add=True, fuse_scale=False`` with ratio 1/16 (1/4 here, for small channels). Its attention
  conv has a bias (cancelled by the softmax); its ``LayerNorm2d`` uses ``eps=1e-6`` (torch's default
  ``1e-5`` in fastattn: set to match here).
* ``NonLocalAttn``: scale ``in_channels ** -0.5`` by default (``use_scale=True``), where the embedded
  Gaussian has none (``use_scale=False`` is the paper; the default corresponds to fastattn's
  ``scale=C ** -0.5``); ``rd_ratio=1/8`` (the paper: 1/2); BatchNorm after ``W_z`` (fastattn
  ``norm="batch"``).

timm's layer package imports torchvision at import time (for ``FrozenBatchNorm2d``, which none of
these modules uses). Where torchvision is missing or does not load (its PyPI wheel is a CUDA build;
this project pins CPU torch), the three modules are imported with a stand-in for that one name,
inside a temporary ``sys.modules`` patch that is undone afterwards.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from unittest import mock

import pytest
import torch
from torch import nn

import fastattn
from helpers import feature_map, randomized

C = 32


def _timm_modules():
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed")
    try:
        from timm.layers.cbam import CbamModule
        from timm.layers.global_context import GlobalContext
        from timm.layers.non_local_attn import NonLocalAttn
        return CbamModule, GlobalContext, NonLocalAttn
    except ImportError:
        pass
    pkg = types.ModuleType("timm")  # the package without its __init__ (which imports the model zoo)
    pkg.__path__ = list(spec.submodule_search_locations)
    tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))
    tv.__path__, ops.__path__ = [], []
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (nn.Module,), {})
    stubs = {"timm": pkg, "torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc}
    with mock.patch.dict(sys.modules, stubs):
        for name in [n for n in sys.modules if n.startswith("timm.")]:
            del sys.modules[name]
        try:
            from timm.layers.cbam import CbamModule
            from timm.layers.global_context import GlobalContext
            from timm.layers.non_local_attn import NonLocalAttn
        except ImportError as e:  # another timm version
            pytest.skip(f"timm's layers do not import here: {e}")
    return CbamModule, GlobalContext, NonLocalAttn


@pytest.fixture(scope="module")
def timm_modules():
    return _timm_modules()


def ours(method: str, **options) -> fastattn.Attention2d:
    return randomized(fastattn.Attention2d(C, method, dtype=torch.float64, **options))


def image() -> torch.Tensor:
    return feature_map(channels=C, h=6, w=9)


def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.reshape(dst.shape))


def copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        src.running_mean.uniform_(-0.5, 0.5)
        src.running_var.uniform_(0.5, 2.0)
    dst.load_state_dict(src.state_dict())


@pytest.mark.parametrize("mlp_bias", [True, False])
def test_cbam_matches_timm(timm_modules, mlp_bias):
    cbam_cls = timm_modules[0]
    m = ours("cbam", reduction=4, spatial_kernel=7, mlp_bias=mlp_bias, spatial_bn=True)
    blk = m.block
    peer = cbam_cls(C, rd_ratio=1 / 4, spatial_kernel_size=7, mlp_bias=mlp_bias).double().eval()
    copy(peer.channel.fc1.weight, blk.mlp[0].weight)
    copy(peer.channel.fc2.weight, blk.mlp[2].weight)
    if mlp_bias:
        copy(peer.channel.fc1.bias, blk.mlp[0].bias)
        copy(peer.channel.fc2.bias, blk.mlp[2].bias)
    copy(peer.spatial.conv.conv.weight, blk.spatial.weight)
    copy_bn(peer.spatial.conv.bn, blk.bn)
    x = image()
    torch.testing.assert_close(m(x), peer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fusion", ["add", "scale"])
def test_gcnet_matches_timm(timm_modules, fusion):
    gc_cls = timm_modules[1]
    m = ours("gcnet", reduction=4, fusion=fusion)
    blk = m.block
    blk.transform[1].eps = 1e-6  # timm's LayerNorm2d epsilon
    peer = gc_cls(C, fuse_add=fusion == "add", fuse_scale=fusion == "scale", rd_ratio=1 / 4).double().eval()
    mlp = peer.mlp_add if fusion == "add" else peer.mlp_scale
    copy(peer.conv_attn.weight, blk.key.weight)
    with torch.no_grad():
        peer.conv_attn.bias.fill_(0.7)  # any bias: the softmax over positions cancels it
    copy(mlp.fc1.weight, blk.transform[0].weight)
    copy(mlp.fc1.bias, blk.transform[0].bias)
    copy(mlp.norm.weight, blk.transform[1].weight)
    copy(mlp.norm.bias, blk.transform[1].bias)
    copy(mlp.fc2.weight, blk.transform[3].weight)
    copy(mlp.fc2.bias, blk.transform[3].bias)
    x = image()
    torch.testing.assert_close(m(x), peer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_scale", [False, True])
def test_nonlocal_matches_timm(timm_modules, use_scale):
    nl_cls = timm_modules[2]
    m = ours("nonlocal", reduction=2, norm="batch", **({"scale": C ** -0.5} if use_scale else {}))
    blk = m.block
    peer = nl_cls(C, use_scale=use_scale, rd_ratio=1 / 2).double().eval()
    for name, mine in (("t", blk.theta), ("p", blk.phi), ("g", blk.g), ("z", blk.w_z)):
        copy(getattr(peer, name).weight, mine.weight)
        copy(getattr(peer, name).bias, mine.bias)
    copy_bn(peer.norm, blk.bn)
    x = image()
    torch.testing.assert_close(m(x), peer(x), rtol=1e-11, atol=1e-12)
    if not use_scale:  # timm's default scale differs from the paper's embedded Gaussian
        peer_default = nl_cls(C, rd_ratio=1 / 2).double().eval()
        peer_default.load_state_dict(peer.state_dict())
        assert not torch.allclose(m(x), peer_default(x))
