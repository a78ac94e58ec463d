"""RandAugment with timm semantics (``rand-m9-mstd0.5-inc1`` and friends), in TensorFlow with stateless seeds.

timm's policy (``timm.data.auto_augment.rand_augment_transform``), reproduced here:

* ``n`` ops (default 2) drawn uniformly *with replacement* from the op list; each op is applied with
  probability ``p`` (default 0.5).
* Per application the magnitude is ``m`` (``mstd`` > 0: ~ N(m, mstd); ``mstd`` = inf: ~ U(0, m)), clipped to
  [0, ``mmax``] (default 10), then mapped to the op argument by timm's level functions (sign flipped with
  probability 0.5 for rotate/shear/translate/enhance).
* ``inc1`` selects the "increasing" op list (posterize/solarize/enhance get stronger with m).
* Geometric ops fill with the dataset mean (timm passes ``img_mean``); they sample bilinearly (timm uses the
  train interpolation, bicubic for DeiT: TensorFlow's affine op offers only nearest/bilinear).

Images are float32 [H, W, 3] with integer values in [0, 255]; each colour op reproduces the PIL function timm
calls (``ImageOps.autocontrast/equalize/solarize/posterize``, ``ImageEnhance.*``) and is tested against it.
"""
from __future__ import annotations

import math
import re

import tensorflow as tf

from vit_jax_fix.data import transforms as T

LEVEL_DENOM = 10.0
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
DEFAULT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
               "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def parse_config(config_str: str) -> dict:
  """'rand-m9-mstd0.5-inc1' -> dict(magnitude=9, num_layers=2, magnitude_std=0.5, ops=INCREASING_OPS, ...)."""
  parts = config_str.split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment config {config_str!r} must start with 'rand-' (timm syntax, e.g. "
                     "'rand-m9-mstd0.5-inc1').")
  out = dict(magnitude=10.0, num_layers=2, magnitude_std=0.0, magnitude_max=LEVEL_DENOM, prob=0.5,
             ops=DEFAULT_OPS)
  for part in parts[1:]:
    m = re.fullmatch(r"([a-z]+)([\d.]+|inf)", part)
    if not m:
      raise ValueError(f"Cannot parse {part!r} in RandAugment config {config_str!r}.")
    key, val = m.groups()
    if key == "mstd":
      out["magnitude_std"] = float(val)
    elif key == "mmax":
      out["magnitude_max"] = float(val)
    elif key == "inc":
      out["ops"] = INCREASING_OPS if int(val) else DEFAULT_OPS
    elif key == "m":
      out["magnitude"] = float(val)
    elif key == "n":
      out["num_layers"] = int(val)
    elif key == "p":
      out["prob"] = float(val)
    else:
      raise ValueError(f"Unsupported RandAugment option {key!r} in {config_str!r} (supported: m, n, mstd, "
                       "mmax, inc, p).")
  return out


# ------------------------------------------------------------------------------------------- colour ops


def auto_contrast(img):
  """PIL ImageOps.autocontrast (cutoff 0): per channel, stretch [min, max] to [0, 255]."""
  lo = tf.reduce_min(img, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(img, axis=[0, 1], keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  out = tf.clip_by_value(tf.floor((img - lo) * scale + 1e-4), 0.0, 255.0)
  return tf.where(hi > lo, out, img)


def equalize(img):
  """PIL ImageOps.equalize, per channel (all three channels at once)."""
  x = tf.cast(tf.reshape(tf.transpose(img, [2, 0, 1]), [3, -1]), tf.int32)  # [3, H*W]
  hist = tf.math.bincount(x, minlength=256, maxlength=256, axis=-1)  # [3, 256]
  # PIL: step = (total - count of the last non-empty bin) // 255; lut[i] = (step // 2 + sum(hist[:i])) // step
  last_bin = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), [1]), axis=1, output_type=tf.int32)
  last = tf.gather(hist, last_bin, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last) // 255  # [3]
  cum = tf.cumsum(hist, axis=1, exclusive=True)
  lut = tf.minimum((step[:, None] // 2 + cum) // tf.maximum(step[:, None], 1), 255)
  out = tf.cast(tf.gather(lut, x, batch_dims=1), tf.float32)
  out = tf.where(step[:, None] > 0, out, tf.cast(x, tf.float32))
  return tf.transpose(tf.reshape(out, [3, tf.shape(img)[0], tf.shape(img)[1]]), [1, 2, 0])


def invert(img):
  return 255.0 - img


def posterize(img, bits):
  """PIL ImageOps.posterize: keep the `bits` most significant bits."""
  shift = tf.cast(8 - bits, tf.int32)
  x = tf.cast(img, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.float32)


def solarize_add(img, add, threshold=128.0):
  return tf.where(img < threshold, tf.minimum(img + add, 255.0), img)


def sharpness(img, factor):
  """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (3x3, centre 5, /13; borders kept)."""
  k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  x = tf.transpose(img, [2, 0, 1])[..., None]
  smooth = tf.nn.conv2d(x, k[:, :, None, None], 1, "VALID")
  smooth = tf.transpose(tf.round(smooth[..., 0]), [1, 2, 0])
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  rows = tf.range(h)[:, None, None]
  cols = tf.range(w)[None, :, None]
  interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
  degenerate = tf.where(interior, degenerate, img)
  return T.blend(degenerate, img, factor)


# ----------------------------------------------------------------------------------------- geometric ops


def affine(img, matrix, fill):
  """PIL Image.transform(AFFINE, (a, b, c, d, e, f)): output (x, y) samples input (ax + by + c, dx + ey + f).

  PIL works in pixel-centre coordinates; TF's transform in pixel indices, hence the 0.5 shifts. The
  per-channel fill is applied by transforming (img - fill) with zero fill and adding it back.
  """
  a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
  c = a * 0.5 + b * 0.5 + c - 0.5
  f = d * 0.5 + e * 0.5 + f - 0.5
  transform = tf.reshape(tf.stack([a, b, c, d, e, f, 0.0, 0.0]), [1, 8])
  fill = tf.constant(fill, tf.float32)
  hw = tf.shape(img)[:2]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(img - fill)[None], transforms=transform, output_shape=hw, fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.round(tf.clip_by_value(out + fill, 0.0, 255.0))


def rotate(img, degrees, fill):
  """PIL Image.rotate(degrees) about the image centre (counter-clockwise for positive degrees)."""
  hw = tf.cast(tf.shape(img)[:2], tf.float32)
  cx, cy = hw[1] / 2.0, hw[0] / 2.0
  ang = -degrees * math.pi / 180.0
  a, b, d, e = tf.cos(ang), tf.sin(ang), -tf.sin(ang), tf.cos(ang)
  c = a * -cx + b * -cy + cx
  f = d * -cx + e * -cy + cy
  return affine(img, (a, b, c, d, e, f), fill)


# --------------------------------------------------------------------------------------------- policy


def _signed(level, seed):
  return tf.where(T.uniform(seed) > 0.5, -level, level)


def _enhance_increasing(level, seed):
  return tf.maximum(0.1, 1.0 + _signed(level / LEVEL_DENOM * 0.9, seed))


def _op_fns(fill):
  """name -> fn(img, magnitude, sign_seed)."""
  def lv(m):
    return m / LEVEL_DENOM

  def size(img):
    return tf.cast(tf.shape(img)[:2], tf.float32)
  return {
      "AutoContrast": lambda x, m, s: auto_contrast(x),
      "Equalize": lambda x, m, s: equalize(x),
      "Invert": lambda x, m, s: invert(x),
      "Rotate": lambda x, m, s: rotate(x, _signed(lv(m) * 30.0, s), fill),
      "Posterize": lambda x, m, s: posterize(x, tf.cast(lv(m) * 4, tf.int32)),
      "PosterizeIncreasing": lambda x, m, s: posterize(x, 4 - tf.cast(lv(m) * 4, tf.int32)),
      "Solarize": lambda x, m, s: T.solarize(x, tf.minimum(256.0, tf.floor(lv(m) * 256))),
      "SolarizeIncreasing": lambda x, m, s: T.solarize(x, 256.0 - tf.minimum(256.0, tf.floor(lv(m) * 256))),
      "SolarizeAdd": lambda x, m, s: solarize_add(x, tf.minimum(128.0, tf.floor(lv(m) * 110))),
      "Color": lambda x, m, s: T.adjust_saturation(x, lv(m) * 1.8 + 0.1),
      "ColorIncreasing": lambda x, m, s: T.adjust_saturation(x, _enhance_increasing(m, s)),
      "Contrast": lambda x, m, s: T.adjust_contrast(x, lv(m) * 1.8 + 0.1),
      "ContrastIncreasing": lambda x, m, s: T.adjust_contrast(x, _enhance_increasing(m, s)),
      "Brightness": lambda x, m, s: T.adjust_brightness(x, lv(m) * 1.8 + 0.1),
      "BrightnessIncreasing": lambda x, m, s: T.adjust_brightness(x, _enhance_increasing(m, s)),
      "Sharpness": lambda x, m, s: sharpness(x, lv(m) * 1.8 + 0.1),
      "SharpnessIncreasing": lambda x, m, s: sharpness(x, _enhance_increasing(m, s)),
      "ShearX": lambda x, m, s: affine(x, (1.0, _signed(lv(m) * 0.3, s), 0.0, 0.0, 1.0, 0.0), fill),
      "ShearY": lambda x, m, s: affine(x, (1.0, 0.0, 0.0, _signed(lv(m) * 0.3, s), 1.0, 0.0), fill),
      "TranslateXRel": lambda x, m, s: affine(
          x, (1.0, 0.0, _signed(lv(m) * 0.45, s) * size(x)[1], 0.0, 1.0, 0.0), fill),
      "TranslateYRel": lambda x, m, s: affine(
          x, (1.0, 0.0, 0.0, 0.0, 1.0, _signed(lv(m) * 0.45, s) * size(x)[0]), fill),
  }


class RandAugment:
  """Callable (img, seed) -> img implementing a timm RandAugment config string."""

  def __init__(self, config_str: str, fill=(124, 116, 104)):
    self.cfg = parse_config(config_str)
    fns = _op_fns(tuple(float(v) for v in fill))
    self.ops = [fns[name] for name in self.cfg["ops"]]

  def _magnitude(self, seed):
    c = self.cfg
    m, std = c["magnitude"], c["magnitude_std"]
    if std == float("inf"):
      m = T.uniform(seed, (), 0.0, m)
    elif std > 0:
      m = m + std * tf.random.stateless_normal((), seed)
    else:
      m = tf.constant(m, tf.float32)
    return tf.clip_by_value(m, 0.0, c["magnitude_max"])

  def __call__(self, img, seed):
    # One switch_case inside a while_loop: each op is traced once, not once per layer (tracing dominates
    # pipeline start-up). Index len(ops) is the identity, used when the layer's op is skipped (prob p).
    seeds = tf.random.experimental.stateless_split(seed, self.cfg["num_layers"])
    shape = img.shape

    def body(i, x):
      s_op, s_apply, s_mag, s_sign = T.split_seed(seeds[i], 4)
      idx = tf.random.stateless_uniform((), s_op, 0, len(self.ops), dtype=tf.int32)
      idx = tf.where(T.uniform(s_apply) < self.cfg["prob"], idx, len(self.ops))
      mag = self._magnitude(s_mag)
      branches = [lambda f=f: tf.ensure_shape(f(x, mag, s_sign), shape) for f in self.ops] + [lambda: x]
      return i + 1, tf.switch_case(idx, branches)
    _, img = tf.while_loop(lambda i, x: i < self.cfg["num_layers"], body, (tf.constant(0), img))
    return img
