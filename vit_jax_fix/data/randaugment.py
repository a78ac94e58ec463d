"""RandAugment with timm semantics (``rand-m9-mstd0.5-inc1`` and friends), in TensorFlow with stateless seeds.

timm's policy (``timm.data.auto_augment.rand_augment_transform``), reproduced here:

* ``n`` ops (default 2) drawn uniformly *with replacement* from the op list; each op is applied with
  probability ``p`` (default 0.5).
* Per application the magnitude is ``m`` (``mstd`` > 0: ~ N(m, mstd); ``mstd`` = inf: ~ U(0, m)), clipped to
  [0, ``mmax``] (default 10), then mapped to the op argument by timm's level functions (sign flipped with
  probability 0.5 for rotate/shear/translate/enhance).
* ``inc1`` selects the "increasing" op list (posterize/solarize/enhance get stronger with m).
* Geometric ops (rotate, shear x/y, translate x/y) are Pillow affine transforms, reimplemented here in
  float64 TF ops (:func:`affine`, tested against ``Image.transform``): fill with the dataset mean (timm
  passes ``img_mean``); resampling as timm's ``create_transform`` sets it: the train interpolation (bicubic
  for DeiT), or, when that is 'random', bilinear or bicubic drawn per op application (``_RANDOM_INTERPOLATION``).

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


AFFINE_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _f64(v):
  # Python numbers straight to float64 (tf.cast would round them through float32 first).
  return tf.cast(v, tf.float64) if tf.is_tensor(v) else tf.constant(v, tf.float64)


def _tap_weights(t, method):
  """Weights [..., 4] of the taps at offsets -1, 0, 1, 2 from floor(s - 0.5), t = the fractional part.

  Pillow's affine filters: nearest takes the pixel containing s (offset 0, or 1 when t >= 0.5); bilinear is
  linear between offsets 0 and 1; bicubic is cubic convolution with a = -1 (Pillow's transform kernel: its
  resize uses a = -0.5, its affine ``bicubic_filter`` the a = -1 polynomial).
  """
  zero = tf.zeros_like(t)
  if method == "nearest":
    up = tf.cast(t >= 0.5, t.dtype)
    return tf.stack([zero, 1.0 - up, up, zero], -1)
  if method == "bilinear":
    return tf.stack([zero, 1.0 - t, t, zero], -1)
  t2 = t * t
  t3 = t2 * t
  return tf.stack([-t + 2.0 * t2 - t3, 1.0 - 2.0 * t2 + t3, t + t2 - t3, t3 - t2], -1)


def _weights(t, method):
  if isinstance(method, str):
    return _tap_weights(t, method)
  return tf.switch_case(method, [lambda m=m: _tap_weights(t, m) for m in AFFINE_INTERPOLATIONS])


def _interpolate(taps, weights, centre):
  """taps [P, K, C], weights [P, K], centre [P, C] -> centre + sum w (taps - centre): equal to sum w taps (the
  weights sum to 1) but exact wherever the neighbourhood is flat, as Pillow's difference form is; then
  truncated to the uint8 grid like Pillow."""
  out = centre + tf.einsum("pk,pkc->pc", weights, taps - centre[:, None])  # a batched matvec: faster
  return tf.floor(tf.clip_by_value(out, 0.0, 255.0))


_OFFSETS = (-1, 0, 1, 2)


def _edge_pad(x, axis: int, n: int):
  """Pads n copies of the first/last slice along `axis` (Pillow clamps taps to the edge pixels)."""
  first = tf.repeat(tf.gather(x, [0], axis=axis), n, axis=axis)
  last = tf.repeat(tf.gather(x, [tf.shape(x)[axis] - 1], axis=axis), n, axis=axis)
  return tf.concat([first, x, last], axis)


def _shift_rows(img, q, method):
  """Output pixel (x, y) samples input row y at x + 0.5 + q[y] in Pillow's pixel-centre coordinates, i.e. at
  tap position x + q[y] (shear x: q = b y' + c; translate x: q = c).

  The fractional part of the source column is the same along a row, so each row is filtered once with its
  4 tap weights (slices of the edge-padded image) and the filtered row is then read at the integer shift: one
  gather per pixel instead of four. Out-of-image pixels read a clamped index; the caller fills them.
  """
  w = tf.shape(img)[1]
  k = tf.floor(q)  # q: [H, 1] float64
  weights = _weights(tf.cast(q - k, tf.float32), method)  # [H, 1, 4]
  padded = _edge_pad(img, 1, 2)  # column u of img is column u + 2
  # filtered[:, u + 1] = sum_j weights_j * img[:, clamp(u + j - 1)], u = -1 .. W - 1
  taps = [padded[:, j:j + w + 1] for j in range(4)]
  centre = taps[1]
  filtered = centre
  for j in (0, 2, 3):
    filtered = filtered + weights[:, :, j:j + 1] * (taps[j] - centre)
  filtered = tf.floor(tf.clip_by_value(filtered, 0.0, 255.0))
  cols = tf.clip_by_value(tf.range(w)[None, :] + tf.cast(k, tf.int32), -1, w - 1) + 1  # [H, W]
  return tf.gather(filtered, cols, axis=1, batch_dims=1)


def _warp_2d(img, sx, sy, method):
  """General case (rotation): 16 taps per pixel, weights outer(wy, wx).

  The 4 taps of a row are adjacent in memory once each pixel carries its 3 right neighbours (``quads``, built
  from the edge-padded image), so a pixel needs 4 gathers of 12 values instead of 16 of 3. Only source points
  inside the image are used (the caller fills the rest), so x0, y0 are clamped to [-1, size - 1].
  """
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  sx, sy = sx - 0.5, sy - 0.5
  x0, y0 = tf.floor(sx), tf.floor(sy)
  padded = _edge_pad(_edge_pad(img, 0, 2), 1, 2)  # img[y, x] at padded[y + 2, x + 2]
  quads = tf.concat([padded[:, j:j + w + 1] for j in range(4)], -1)  # [H + 4, W + 1, 4C]: cols u - 2 .. u + 1
  col = tf.clip_by_value(tf.cast(x0, tf.int32), -1, w - 1) + 1  # quads column holding x0 - 1 .. x0 + 2
  row = tf.clip_by_value(tf.cast(y0, tf.int32), -1, h - 1) + 1  # padded row of y0 - 1
  idx = (row * (w + 1) + col)[..., None] + tf.range(4) * (w + 1)  # [H', W', 4]: rows y0 - 1 .. y0 + 2
  channels = tf.shape(img)[2]
  taps = tf.reshape(tf.gather(tf.reshape(quads, [-1, 4 * channels]), tf.reshape(idx, [-1, 4])),
                    [-1, 16, channels])  # [H' W', 16 (row-major 4 x 4), C]
  wx = _weights(tf.cast(sx - x0, tf.float32), method)
  wy = _weights(tf.cast(sy - y0, tf.float32), method)
  weights = tf.reshape(wy[..., :, None] * wx[..., None, :], [-1, 16])
  out = _interpolate(taps, weights, taps[:, 5])  # tap 5 = offsets (0, 0)
  return tf.reshape(out, tf.concat([tf.shape(sx), [-1]], 0))


def affine(img, matrix, fill, interpolation="bilinear"):
  """PIL ``Image.transform(size, AFFINE, (a, b, c, d, e, f), resample, fillcolor=fill)`` on float32
  [H, W, C] images holding uint8 values.

  Output pixel (x, y) samples the input at (a x' + b y' + c, d x' + e y' + f) with x' = x + 0.5, y' = y + 0.5
  (Pillow works in pixel-centre coordinates). As in Pillow, an output pixel whose source point lies outside
  the input takes the fill colour as is, the interpolation near the border clamps to the edge pixels (no
  blending with the fill), and the result is truncated (not rounded) to the uint8 grid. ``interpolation`` is
  one of AFFINE_INTERPOLATIONS, or a scalar int32 tensor indexing that tuple (a random choice).

  Coordinates are float64 (as Pillow's), interpolation float32: the result equals Pillow's except for rare
  values within float32 rounding of an integer, which may truncate one level apart (tests: max 1 level).
  Pure shears and translations along one axis (all RandAugment ops but rotate) take a cheaper path that
  filters each row (column) once; it gives the same values as the general 16-tap path.
  """
  if isinstance(interpolation, str) and interpolation not in AFFINE_INTERPOLATIONS:
    raise ValueError(f"Affine interpolation {interpolation!r}: use one of {AFFINE_INTERPOLATIONS}.")
  if not isinstance(interpolation, str):
    interpolation = tf.cast(interpolation, tf.int32)
  a, b, c, d, e, f = [_f64(v) for v in matrix]
  img = tf.convert_to_tensor(img, tf.float32)
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  xs = tf.range(wf)[None, :] + 0.5
  ys = tf.range(hf)[:, None] + 0.5
  sx = a * xs + b * ys + c
  sy = d * xs + e * ys + f
  inside = (sx >= 0.0) & (sx < wf) & (sy >= 0.0) & (sy < hf)
  # Pure shears / translations along x (rows map to rows, unit scale) or along y: the other axis needs no
  # interpolation (Pillow's fraction there is exactly 0) and the fraction is constant along each row/column.
  along_x = tf.equal(a, 1.0) & tf.equal(d, 0.0) & tf.equal(e, 1.0) & tf.equal(f, 0.0)
  along_y = tf.equal(e, 1.0) & tf.equal(b, 0.0) & tf.equal(a, 1.0) & tf.equal(c, 0.0)

  def by_rows():
    return _shift_rows(img, b * ys + c, interpolation)

  def by_cols():
    return tf.transpose(_shift_rows(tf.transpose(img, [1, 0, 2]), tf.transpose(d * xs + f), interpolation),
                        [1, 0, 2])

  def general():
    return _warp_2d(img, sx, sy, interpolation)
  out = tf.case([(along_x, by_rows), (along_y, by_cols)], default=general)
  fill = tf.broadcast_to(tf.constant(fill, tf.float32), tf.shape(img))
  return tf.where(inside[..., None], out, fill)


def _round15(v):
  # PIL's Image.rotate rounds cos/sin to 15 decimals (so 90 degrees is an exact 0/1 matrix).
  return tf.round(v * 1e15) / 1e15


def rotate(img, degrees, fill, interpolation="bilinear"):
  """PIL ``Image.rotate(degrees, resample, fillcolor=fill)`` about the image centre (counter-clockwise for
  positive degrees), through the same affine matrix Pillow builds."""
  hw = tf.cast(tf.shape(img)[:2], tf.float64)
  return affine(img, tf.unstack(_rotation_matrix(degrees, hw)), fill, interpolation)


# --------------------------------------------------------------------------------------------- policy


def _signed(level, seed):
  return tf.where(T.uniform(seed) > 0.5, -level, level)


def _enhance_increasing(level, seed):
  return tf.maximum(0.1, 1.0 + _signed(level / LEVEL_DENOM * 0.9, seed))


def _lv(m):
  return m / LEVEL_DENOM


def _colour_ops():
  """name -> fn(img, magnitude, sign_seed)."""
  return {
      "AutoContrast": lambda x, m, s: auto_contrast(x),
      "Equalize": lambda x, m, s: equalize(x),
      "Invert": lambda x, m, s: invert(x),
      "Posterize": lambda x, m, s: posterize(x, tf.cast(_lv(m) * 4, tf.int32)),
      "PosterizeIncreasing": lambda x, m, s: posterize(x, 4 - tf.cast(_lv(m) * 4, tf.int32)),
      "Solarize": lambda x, m, s: T.solarize(x, tf.minimum(256.0, tf.floor(_lv(m) * 256))),
      "SolarizeIncreasing": lambda x, m, s: T.solarize(x, 256.0 - tf.minimum(256.0, tf.floor(_lv(m) * 256))),
      "SolarizeAdd": lambda x, m, s: solarize_add(x, tf.minimum(128.0, tf.floor(_lv(m) * 110))),
      "Color": lambda x, m, s: T.adjust_saturation(x, _lv(m) * 1.8 + 0.1),
      "ColorIncreasing": lambda x, m, s: T.adjust_saturation(x, _enhance_increasing(m, s)),
      "Contrast": lambda x, m, s: T.adjust_contrast(x, _lv(m) * 1.8 + 0.1),
      "ContrastIncreasing": lambda x, m, s: T.adjust_contrast(x, _enhance_increasing(m, s)),
      "Brightness": lambda x, m, s: T.adjust_brightness(x, _lv(m) * 1.8 + 0.1),
      "BrightnessIncreasing": lambda x, m, s: T.adjust_brightness(x, _enhance_increasing(m, s)),
      "Sharpness": lambda x, m, s: sharpness(x, _lv(m) * 1.8 + 0.1),
      "SharpnessIncreasing": lambda x, m, s: sharpness(x, _enhance_increasing(m, s)),
  }


def _rotation_matrix(degrees, hw):
  """The affine matrix PIL's Image.rotate builds (about the centre, cos/sin rounded to 15 decimals)."""
  cx, cy = hw[1] / 2.0, hw[0] / 2.0
  ang = -_f64(degrees) * (math.pi / 180.0)
  a, b = _round15(tf.cos(ang)), _round15(tf.sin(ang))
  d, e = -b, a
  return tf.stack([a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy])


def _geometric_ops():
  """name -> fn(hw float64 [2], magnitude, sign_seed) -> PIL affine matrix float64 [6] (timm's level args)."""
  def mat(a, b, c, d, e, f):
    return tf.stack([_f64(v) for v in (a, b, c, d, e, f)])

  def signed(m, scale, s):
    return tf.cast(_signed(_lv(m) * scale, s), tf.float64)
  return {
      "Rotate": lambda hw, m, s: _rotation_matrix(signed(m, 30.0, s), hw),
      "ShearX": lambda hw, m, s: mat(1.0, signed(m, 0.3, s), 0.0, 0.0, 1.0, 0.0),
      "ShearY": lambda hw, m, s: mat(1.0, 0.0, 0.0, signed(m, 0.3, s), 1.0, 0.0),
      "TranslateXRel": lambda hw, m, s: mat(1.0, 0.0, signed(m, 0.45, s) * hw[1], 0.0, 1.0, 0.0),
      "TranslateYRel": lambda hw, m, s: mat(1.0, 0.0, 0.0, 0.0, 1.0, signed(m, 0.45, s) * hw[0]),
  }


def timm_interpolation(train_interpolation):
  """The interpolation timm's RandAugment uses for a train interpolation (``create_transform``): the same
  one, except 'random' (and None) -> a random choice of bilinear / bicubic per op; methods Pillow's affine
  transform does not offer ('area', 'lanczos3') -> bicubic, timm's default."""
  if train_interpolation in (None, "random"):
    return "random"
  return train_interpolation if train_interpolation in AFFINE_INTERPOLATIONS else "bicubic"


class RandAugment:
  """Callable (img, seed) -> img implementing a timm RandAugment config string.

  ``interpolation`` is the resampling of the geometric ops: 'random' (timm's default
  ``_RANDOM_INTERPOLATION``: bilinear or bicubic, drawn per op application), or one of AFFINE_INTERPOLATIONS
  (timm passes the train interpolation unless it is 'random'; see :func:`timm_interpolation`).
  """

  def __init__(self, config_str: str, fill=(124, 116, 104), interpolation: str = "random", ops=None):
    self.cfg = parse_config(config_str)
    if ops is not None:  # an explicit op list (timm's ``rand_augment_transform(..., transforms=...)``)
      unknown = set(ops) - set(_colour_ops()) - set(_geometric_ops())
      if unknown:
        raise ValueError(f"Unknown RandAugment op(s) {sorted(unknown)}.")
      self.cfg["ops"] = tuple(ops)
    if interpolation != "random" and interpolation not in AFFINE_INTERPOLATIONS:
      raise ValueError(f"RandAugment interpolation {interpolation!r}: use 'random' or one of "
                       f"{AFFINE_INTERPOLATIONS}.")
    self.interpolation = interpolation
    self.fill = tuple(float(v) for v in fill)
    colour, geometric = _colour_ops(), _geometric_ops()
    self.colour = [colour.get(name) for name in self.cfg["ops"]]
    self.geometric = [geometric[name] for name in self.cfg["ops"] if name in geometric]
    # op index -> index into self.geometric, -1 for colour ops and for the identity (index len(ops)).
    self.geo_index = [-1] * (len(self.cfg["ops"]) + 1)
    for j, name in enumerate(n for n in self.cfg["ops"] if n in geometric):
      self.geo_index[self.cfg["ops"].index(name)] = j

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

  def interpolation_index(self, sign_seed):
    """The layer's interpolation as an index into AFFINE_INTERPOLATIONS; 'random' draws it from a stream
    folded out of the layer's sign seed (the op, magnitude and sign draws are unchanged by it)."""
    if self.interpolation != "random":
      return tf.constant(AFFINE_INTERPOLATIONS.index(self.interpolation), tf.int32)
    u = T.uniform(tf.random.experimental.stateless_fold_in(sign_seed, 1))
    return tf.where(u < 0.5, AFFINE_INTERPOLATIONS.index("bilinear"), AFFINE_INTERPOLATIONS.index("bicubic"))

  @tf.autograph.experimental.do_not_convert  # plain TF control flow; converting only slows tracing
  def __call__(self, img, seed):
    # Inside a while_loop over layers: one switch_case over the colour ops and, for geometric ops, one switch
    # over their affine matrices followed by a single warp, so every op (and the warp) is traced once, not
    # once per layer (tracing dominates pipeline start-up). Index len(ops) is the identity, used when the
    # layer's op is skipped (prob p).
    seeds = tf.random.experimental.stateless_split(seed, self.cfg["num_layers"])
    shape = img.shape
    n_ops = len(self.cfg["ops"])
    geo_index = tf.constant(self.geo_index, tf.int32)

    def body(i, x):
      s_op, s_apply, s_mag, s_sign = T.split_seed(seeds[i], 4)
      idx = tf.random.stateless_uniform((), s_op, 0, n_ops, dtype=tf.int32)
      idx = tf.where(T.uniform(s_apply) < self.cfg["prob"], idx, n_ops)
      mag = self._magnitude(s_mag)
      branches = [(lambda f=f: tf.ensure_shape(f(x, mag, s_sign), shape)) if f is not None else (lambda: x)
                  for f in self.colour] + [lambda: x]
      x = tf.switch_case(idx, branches)
      if self.geometric:
        g = geo_index[idx]

        def warp():
          hw = tf.cast(tf.shape(x)[:2], tf.float64)
          matrix = tf.switch_case(tf.maximum(g, 0), [lambda f=f: f(hw, mag, s_sign) for f in self.geometric])
          interp = self.interpolation if self.interpolation != "random" else self.interpolation_index(s_sign)
          return tf.ensure_shape(affine(x, tf.unstack(matrix), self.fill, interp), shape)
        x = tf.cond(g >= 0, warp, lambda: x)
      return i + 1, x
    _, img = tf.while_loop(lambda i, x: i < self.cfg["num_layers"], body, (tf.constant(0), img))
    return img
