"""RegNetY (Radosavovic et al. 2020, "Designing Network Design Spaces"): the CNN that DeiT distils from
(RegNetY-16GF = timm's `regnety_160`, DeiT's released teacher `regnety_160-a5fe301d.pth`).

Widths come from the quantised linear rule of the paper: u_j = w0 + wa * j for block j < depth,
s_j = round(log(u_j / w0) / log(wm)), w_j = 8 * round(w0 * wm^s_j / 8); consecutive blocks of equal width form a
stage (4 for the registered models); each stage width is then rounded to a multiple of its group width
g = min(group_size, w) (bottleneck ratio 1). Every stage starts with stride 2.

    stem   conv 3x3 / 2 (3 -> 32) - BN - ReLU
    block  y = ReLU(BN(conv 1x1 x));  y = ReLU(BN(grouped conv 3x3 / s y))  (w / g groups)
           y = y * sigmoid(fc2(ReLU(fc1(mean_hw y))))    SE, fc1: w -> round(se_ratio * block input width)
           y = BN(conv 1x1 y);  x = ReLU(y + shortcut(x)),  shortcut = BN(conv 1x1 / s x) where shape changes
    head   global average pool - Linear

BatchNorm as torch (eps 1e-5, momentum 0.1; running statistics are `nnx.BatchStat`). Attribute names mirror
timm's modules (`stem.conv`, `s1.b1.conv2.bn`, `s4.b1.se.fc1`, `head.fc`), so `interop.state_dict` converts
timm's `regnety_160` state dict -- and DeiT's teacher file, which has the same keys -- with no name table.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx


def stage_widths(w0: int, wa: float, wm: float, depth: int, group_size: int) -> tuple[list, list, list]:
  """(widths, depths, group widths) of the stages, from the quantised linear rule of the module docstring."""
  u = np.arange(depth) * wa + w0
  s = np.round(np.log(u / w0) / np.log(wm))
  w = (np.round(w0 * np.power(wm, s) / 8) * 8).astype(int)
  widths, depths = np.unique(w, return_counts=True)
  groups = [min(group_size, int(x)) for x in widths]
  widths = [int(round(int(x) / g) * g) for x, g in zip(widths, groups)]
  return widths, [int(d) for d in depths], groups


def _conv(cin, cout, k, *, rngs, stride=1, groups=1, bias=False):
  # torch's Conv2d with padding k // 2; kaiming-normal fan-out init as timm's RegNet
  std = float(np.sqrt(2.0 / (k * k * cout / groups)))
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2, feature_group_count=groups,
                  use_bias=bias, kernel_init=nnx.initializers.normal(std), rngs=rngs)


class ConvNormAct(nnx.Module):
  """conv - BatchNorm - optional ReLU (timm's ConvNormAct: keys conv.weight, bn.*)."""

  def __init__(self, cin, cout, k, *, rngs, stride=1, groups=1, act=True, zero_gamma=False):
    self.conv = _conv(cin, cout, k, rngs=rngs, stride=stride, groups=groups)
    self.bn = nnx.BatchNorm(cout, momentum=0.9, epsilon=1e-5, rngs=rngs,
                            scale_init=nnx.initializers.zeros if zero_gamma else nnx.initializers.ones)
    self.act = act

  def __call__(self, x):
    x = self.bn(self.conv(x))
    return jax.nn.relu(x) if self.act else x


class SE(nnx.Module):
  """Squeeze-and-excitation with 1x1 convolutions (keys fc1, fc2)."""

  def __init__(self, width, reduced, *, rngs):
    self.fc1 = _conv(width, reduced, 1, rngs=rngs, bias=True)
    self.fc2 = _conv(reduced, width, 1, rngs=rngs, bias=True)

  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    return x * jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))


class Bottleneck(nnx.Module):

  def __init__(self, cin, cout, *, stride, group_width, se_ratio, rngs):
    self.conv1 = ConvNormAct(cin, cout, 1, rngs=rngs)
    self.conv2 = ConvNormAct(cout, cout, 3, rngs=rngs, stride=stride, groups=cout // group_width)
    self.se = SE(cout, int(round(cin * se_ratio)), rngs=rngs) if se_ratio else nnx.data(None)
    self.conv3 = ConvNormAct(cout, cout, 1, rngs=rngs, act=False, zero_gamma=True)
    self.downsample = (ConvNormAct(cin, cout, 1, rngs=rngs, stride=stride, act=False)
                       if cin != cout or stride != 1 else nnx.data(None))

  def __call__(self, x):
    y = self.conv2(self.conv1(x))
    if self.se is not None:
      y = self.se(y)
    y = self.conv3(y)
    return jax.nn.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Stage(nnx.Module):
  """Blocks b1..bn (timm's names)."""

  def __init__(self, cin, cout, depth, *, group_width, se_ratio, rngs):
    self.depth = depth
    for i in range(depth):
      setattr(self, f"b{i + 1}", Bottleneck(cin if i == 0 else cout, cout, stride=2 if i == 0 else 1,
                                            group_width=group_width, se_ratio=se_ratio, rngs=rngs))

  def __call__(self, x):
    for i in range(self.depth):
      x = getattr(self, f"b{i + 1}")(x)
    return x


class Head(nnx.Module):
  def __init__(self, width, num_classes, *, rngs):
    self.fc = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.normal(0.01), rngs=rngs)

  def __call__(self, x):
    return self.fc(x)


class RegNet(nnx.Module):
  """RegNetY (se_ratio > 0) / RegNetX (se_ratio 0). Input (B, H, W, C) at any size; returns logits, or the
  pooled features (B, width) when num_classes=0. `img_size` is accepted for the trainer and not used."""

  def __init__(self, *, w0: int = 200, wa: float = 106.23, wm: float = 2.48, group_size: int = 112, depth: int = 18,
               se_ratio: float = 0.25, stem_width: int = 32, in_chans: int = 3, num_classes: int = 1000,
               img_size=224, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(params=0)
    self.num_classes = num_classes
    widths, depths, groups = stage_widths(w0, wa, wm, depth, group_size)
    self.num_stages = len(widths)
    self.stem = ConvNormAct(in_chans, stem_width, 3, rngs=rngs, stride=2)
    cin = stem_width
    for i, (w, d, g) in enumerate(zip(widths, depths, groups)):
      setattr(self, f"s{i + 1}", Stage(cin, w, d, group_width=g, se_ratio=se_ratio, rngs=rngs))
      cin = w
    self.num_features = cin
    self.head = Head(cin, num_classes, rngs=rngs) if num_classes else nnx.data(None)

  def __call__(self, images):
    x = self.stem(images)
    for i in range(self.num_stages):
      x = getattr(self, f"s{i + 1}")(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x) if self.head is not None else x
