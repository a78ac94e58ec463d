"""Per-example image transforms in TensorFlow (tf.data, on host), all driven by stateless random ops.

Every random op takes an explicit ``seed`` (int64 [2]) so an example's augmentation depends only on
(run seed, host, position in the stream), never on where an iterator started: that is what makes resumed
iterators bit-identical. Images between ops are float32 [H, W, 3] holding integer values in [0, 255] (the
PIL ``uint8`` convention that torchvision/timm ops use); normalization comes last.

Definitions follow torchvision / timm / the DeiT code:

* ``random_resized_crop``: torchvision ``RandomResizedCrop`` (10 attempts, area ~ U(scale), log-uniform
  ratio, fallback to a ratio-clamped centre crop); JPEGs are decoded only inside the window.
* ``simple_random_crop``: DeiT III ``--src``: resize the short side to S, pad 4 (reflect), random S x S crop.
* ``color_jitter``: torchvision ``ColorJitter(b, c, s)`` in random order, factors ~ U(1 - x, 1 + x).
* ``three_augment``: DeiT III: exactly one of grayscale, solarize(128), Gaussian blur sigma ~ U(0.1, 2).
* ``random_erasing``: timm ``RandomErasing(mode='pixel', count 1)`` on the normalized image.
* ``eval_resize_crop``: resize the short side to floor(S / crop_pct), centre crop S (timm eval transform):
  with bicubic/bilinear the pixels equal torchvision's ``Resize`` + ``CenterCrop`` on PIL-decoded JPEGs.
* decoding: JPEGs with libjpeg's accurate integer DCT, as PIL (the fast DCT of ``tf.io.decode_image`` is off
  PIL's pixels by about a level on most values); other formats with ``tf.io.decode_image``.
* ``pil_resize``: PIL's ``Image.resize`` (BICUBIC / BILINEAR) exactly, in TF ops: fixed-point weights and the
  intermediate image rounded to uint8 between the two passes (section "resampling"). The eval resize uses it;
  training crops use ``tf.image.resize`` (same kernels, float, one pass; faster, within about a level).
"""
from __future__ import annotations

import math

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# libjpeg's accurate integer DCT: the one PIL (and so every torchvision/timm loader) decodes with.
JPEG_DCT_METHOD = "INTEGER_ACCURATE"


def split_seed(seed, n: int):
  """n independent int64 [2] seeds derived from one (stateless)."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, n), axis=0)


def uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


# ------------------------------------------------------------------------------------------------ decoding


def decode_image(encoded):
  """Any encoded image (JPEG incl. CMYK, PNG incl. 16-bit/gray/alpha, GIF, BMP) -> uint8 [H, W, 3].

  JPEGs are decoded with libjpeg's accurate integer DCT ('islow'), as PIL does (bit for bit);
  ``tf.io.decode_image`` would use the fast integer DCT (measured on photos: 60-70% of the values off PIL's,
  mostly by one level, up to 18).
  """
  def jpeg():
    return tf.io.decode_jpeg(encoded, channels=3, dct_method=JPEG_DCT_METHOD)

  def other():
    return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
  img = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  img.set_shape([None, None, 3])
  return img


def image_shape(encoded):
  """(height, width) int32 without decoding JPEG pixels."""
  return tf.cond(tf.io.is_jpeg(encoded),
                 lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                 lambda: tf.shape(decode_image(encoded))[:2])


def decode_crop(encoded, top, left, h, w):
  """Decodes only the window [top:top+h, left:left+w] (JPEG: inside libjpeg, which is much faster).

  Equals the full (PIL) decode cropped to the window. libjpeg's cropped decode upsamples a chroma-subsampled
  JPEG's colour at the window's left and right edges as if they were the image's edges (wrong by up to ~10
  levels there), so one more column is decoded on each side and dropped.
  """
  def jpeg():
    width = tf.image.extract_jpeg_shape(encoded)[1]
    first = tf.maximum(left - 1, 0)
    end = tf.minimum(left + w + 1, width)
    img = tf.image.decode_and_crop_jpeg(encoded, tf.stack([top, first, h, end - first]), channels=3,
                                        dct_method=JPEG_DCT_METHOD)
    return img[:, left - first:left - first + w]

  def other():
    return decode_image(encoded)[top:top + h, left:left + w]
  img = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  img.set_shape([None, None, 3])
  return img


# ------------------------------------------------------------------------------------------- resampling
#
# PIL's Image.resize (libImaging/Resample.c) for 8-bit images, which torchvision's Resize calls on PIL images:
# separable convolution, one pass per axis. For an axis of `n` input and `m` output pixels, scale = n / m,
# fs = max(scale, 1) (the kernel widens when shrinking: antialiasing), support = filter support * fs; output
# pixel i has centre c = (i + 0.5) * scale, taps j in [max(int(c - support + 0.5), 0), min(int(c + support +
# 0.5), n)), weights filter((j - c + 0.5) / fs) normalised to sum 1, then fixed point: round-half-away(w * 2^22).
# Each pass sums pixel * weight in integers, adds 2^21, shifts right by 22 and clips to [0, 255]: the
# intermediate image is rounded to uint8 before the second pass. Pillow < 13 always runs the horizontal pass
# first; Pillow >= 13 runs the vertical one first when the height shrinks by more than twice the pixels the
# width does ((h - h') > 2 (w - w')). The order changes the intermediate rounding (and clipping: bicubic
# overshoots), so it is followed here according to the installed Pillow.

_PIL_PRECISION_BITS = 22  # 32 - 8 - 2: two bits of headroom for the negative lobes / overshoot of the kernel


def _pil_bicubic(x):
  a = -0.5  # PIL's bicubic (Keys, a = -0.5), support 2
  x = tf.abs(x)
  return tf.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                  tf.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, tf.zeros_like(x)))


def _pil_bilinear(x):
  x = tf.abs(x)  # triangle, support 1
  return tf.where(x < 1.0, 1.0 - x, tf.zeros_like(x))


PIL_FILTERS = {"bicubic": (_pil_bicubic, 2.0), "bilinear": (_pil_bilinear, 1.0)}


def _installed_pillow_major() -> int:
  try:
    import PIL
    return int(PIL.__version__.split(".")[0])
  except (ImportError, ValueError):
    return 13


# Pass order of the installed Pillow (note above); set False to reproduce Pillow < 13's pixels.
PILLOW_VERTICAL_FIRST = _installed_pillow_major() >= 13


def _pil_weights(in_size, out_size, method: str):
  """PIL's fixed-point coefficients of one axis: (taps int32 [out, K], weights int32 [out, K], K).

  Output pixel i is sum_k in[taps[i, k]] * weights[i, k]; taps past the end of a pixel's window carry weight 0
  (and a clamped index).
  """
  kernel, support = PIL_FILTERS[method]
  scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
  filterscale = tf.maximum(scale, 1.0)
  support = support * filterscale
  ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
  # C's (int) truncates toward zero; a negative start is clamped to 0 either way.
  first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
  count = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - first
  k = tf.range(ksize)
  taps = first[:, None] + k[None, :]
  valid = k[None, :] < count[:, None]
  # The same double-precision operations, in the same order, as PIL: the same weights.
  w = kernel((tf.cast(taps, tf.float64) - center[:, None] + 0.5) * (1.0 / filterscale))
  w = tf.where(valid, w, 0.0)
  total = tf.reduce_sum(w, axis=1, keepdims=True)
  w = tf.where(total != 0.0, w / tf.where(total != 0.0, total, 1.0), w)
  w = w * float(1 << _PIL_PRECISION_BITS)
  w = tf.where(w < 0.0, tf.math.ceil(w - 0.5), tf.math.floor(w + 0.5))  # (int)(w -/+ 0.5)
  return tf.minimum(taps, in_size - 1), tf.cast(w, tf.int32), ksize


def _pil_pass(x, out_size, method: str):
  """Resamples axis 0 of x [n, m] (int32 holding uint8 values) to out_size, rounded and clipped as PIL does.

  One gather + multiply-add per tap (int32, as PIL's sums: no overflow, at most ~1.1 * 255 * 2^22 < 2^31).
  """
  taps, weights, ksize = _pil_weights(tf.shape(x)[0], out_size, method)
  acc = tf.fill(tf.stack([out_size, tf.shape(x)[1]]), 1 << (_PIL_PRECISION_BITS - 1))  # + 1/2: rounding

  def tap(k, acc):
    return k + 1, acc + tf.gather(x, taps[:, k]) * weights[:, k][:, None]
  _, acc = tf.while_loop(lambda k, _: k < ksize, tap, (tf.constant(0), acc))
  # Arithmetic shift = floor division by 2^22, as PIL's `>>`, then clip to the uint8 range.
  return tf.clip_by_value(tf.bitwise.right_shift(acc, _PIL_PRECISION_BITS), 0, 255)


def pil_resize(img, size, method: str):
  """PIL ``Image.resize((w, h), BICUBIC | BILINEAR)`` of an image holding uint8 values [H, W, C], exactly.

  Returns float32 [h, w, C] on the uint8 grid. Pure TF ops (graph mode, parallel in tf.data).
  """
  if method not in PIL_FILTERS:
    raise ValueError(f"PIL-exact resampling supports {sorted(PIL_FILTERS)}, got {method!r}.")
  x = tf.cast(img, tf.int32)
  out_h, out_w = (tf.cast(v, tf.int32) for v in tf.unstack(tf.convert_to_tensor(size)))
  in_h, in_w, c = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]

  def along_axis0(t, n):  # [a, b, C] -> [n, b, C]
    b = tf.shape(t)[1]
    return tf.reshape(_pil_pass(tf.reshape(t, tf.stack([tf.shape(t)[0], -1])), n, method), tf.stack([n, b, c]))

  def vertical(t):
    return along_axis0(t, out_h)

  def horizontal(t):  # on the transpose: each pass gathers whole rows
    return tf.transpose(along_axis0(tf.transpose(t, [1, 0, 2]), out_w), [1, 0, 2])
  if PILLOW_VERTICAL_FIRST:
    vertical_first = (out_h < in_h) & ((in_h - out_h) > 2 * (in_w - out_w))
    x = tf.cond(vertical_first, lambda: horizontal(vertical(x)), lambda: vertical(horizontal(x)))
  else:
    x = vertical(horizontal(x))
  x = tf.cast(x, tf.float32)
  # Keep what is known statically (as tf.image.resize does): later ops build on a static crop size.
  static = tf.get_static_value(tf.convert_to_tensor(size))
  x.set_shape(([int(v) for v in static] if static is not None else [None, None]) + [img.shape[-1]])
  return x


def resize(img, size, method: str, seed=None, *, pil_exact: bool = False):
  """Resize to `size` (h, w) on the uint8 grid; 'random' picks bilinear or bicubic per call (timm).

  pil_exact=True (the eval transform): 'bicubic' and 'bilinear' are PIL's exactly (:func:`pil_resize`, what
  torchvision/timm do to PIL images). Otherwise (training crops, and the methods PIL-exact resampling does not
  cover: 'nearest', 'area', 'lanczos3'): ``tf.image.resize`` with antialiasing, rounded -- for bicubic/bilinear
  the same kernels in float32 in one pass, within about a level of PIL and ~1.6x faster.
  """
  if pil_exact and method in PIL_FILTERS:
    return pil_resize(img, size, method)
  if pil_exact and method == "random":
    return tf.cond(uniform(seed) < 0.5, lambda: pil_resize(img, size, "bilinear"),
                   lambda: pil_resize(img, size, "bicubic"))
  img = tf.cast(img, tf.float32)
  if method == "random":
    img = tf.cond(uniform(seed) < 0.5,
                  lambda: tf.image.resize(img, size, method="bilinear", antialias=True),
                  lambda: tf.image.resize(img, size, method="bicubic", antialias=True))
  else:
    img = tf.image.resize(img, size, method=method, antialias=True)
  # Back to the uint8 grid, as PIL output would be.
  return tf.round(tf.clip_by_value(img, 0.0, 255.0))


# ------------------------------------------------------------------------------------------------- crops


def rrc_window(seed, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """torchvision RandomResizedCrop.get_params: returns (top, left, h, w) int32 scalars."""
  s_area, s_ratio, s_top, s_left = split_seed(seed, 4)
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = hf * wf
  target = area * uniform(s_area, [attempts], scale[0], scale[1])
  log_r = uniform(s_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1]))
  ar = tf.exp(log_r)
  cw = tf.round(tf.sqrt(target * ar))
  ch = tf.round(tf.sqrt(target / ar))
  ok = (cw > 0) & (ch > 0) & (cw <= wf) & (ch <= hf)
  # Fallback (no attempt fits): centre crop with the aspect ratio clamped into `ratio`.
  in_ratio = wf / hf
  fb_w = tf.where(in_ratio < ratio[0], wf, tf.where(in_ratio > ratio[1], tf.round(hf * ratio[1]), wf))
  fb_h = tf.where(in_ratio < ratio[0], tf.round(wf / ratio[0]), hf)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)  # first attempt that fits
  any_ok = tf.reduce_any(ok)
  h = tf.where(any_ok, ch[first], fb_h)
  w = tf.where(any_ok, cw[first], fb_w)
  # randint(0, H - h) inclusive, as torch.randint(0, H - h + 1).
  top_r = tf.floor(uniform(s_top) * (hf - h + 1.0))
  left_r = tf.floor(uniform(s_left) * (wf - w + 1.0))
  top = tf.where(any_ok, top_r, tf.floor((hf - h) / 2.0))
  left = tf.where(any_ok, left_r, tf.floor((wf - w) / 2.0))
  # Guard against fp edge cases so the window always lies inside the image.
  h = tf.clip_by_value(h, 1.0, hf)
  w = tf.clip_by_value(w, 1.0, wf)
  top = tf.clip_by_value(top, 0.0, hf - h)
  left = tf.clip_by_value(left, 0.0, wf - w)
  return tuple(tf.cast(v, tf.int32) for v in (top, left, h, w))


def random_resized_crop(encoded, seed, size: int, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        interpolation="bicubic"):
  s_win, s_interp = split_seed(seed, 2)
  hw = image_shape(encoded)
  top, left, h, w = rrc_window(s_win, hw[0], hw[1], scale, ratio)
  crop = decode_crop(encoded, top, left, h, w)
  return resize(crop, (size, size), interpolation, s_interp)


def resize_short_side(img, short: int, method: str, seed=None, *, pil_exact: bool = False):
  """torchvision Resize(int): short side -> `short`, long side -> int(short * long / short_orig)."""
  hw = tf.cast(tf.shape(img)[:2], tf.float32)
  s = tf.reduce_min(hw)
  new = tf.where(hw == s, float(short), tf.floor(float(short) * hw / s))
  return resize(img, tf.cast(new, tf.int32), method, seed, pil_exact=pil_exact)


def simple_random_crop(encoded, seed, size: int, *, interpolation="bicubic", padding: int = 4):
  s_interp, s_top, s_left = split_seed(seed, 3)
  img = resize_short_side(decode_image(encoded), size, interpolation, s_interp)
  img = tf.pad(img, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
  hw = tf.cast(tf.shape(img)[:2], tf.float32)
  top = tf.cast(tf.floor(uniform(s_top) * (hw[0] - size + 1.0)), tf.int32)
  left = tf.cast(tf.floor(uniform(s_left) * (hw[1] - size + 1.0)), tf.int32)
  out = img[top:top + size, left:left + size]
  out.set_shape([size, size, 3])
  return out


def center_crop(img, size: int):
  hw = tf.shape(img)[:2]
  # torchvision CenterCrop: int(round((H - size) / 2)), Python's round: half to even, as tf.round.
  top = tf.cast(tf.round(tf.cast(hw[0] - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(hw[1] - size, tf.float32) / 2.0), tf.int32)
  out = img[top:top + size, left:left + size]
  out.set_shape([size, size, 3])
  return out


def eval_resize_crop(encoded, size: int, crop_pct: float, interpolation="bicubic"):
  """timm's eval transform: Resize(floor(size / crop_pct), interpolation) + CenterCrop(size), on the uint8 grid.

  Bicubic and bilinear resample exactly as PIL ('random' evaluates bilinear), so with the accurate-DCT JPEG
  decode the pixels equal torchvision's on PIL images.
  """
  scale_size = int(math.floor(size / crop_pct))
  img = resize_short_side(decode_image(encoded), scale_size, "bilinear" if interpolation == "random" else
                          interpolation, pil_exact=True)
  return center_crop(img, size)


def hflip(img, seed, prob: float = 0.5):
  return tf.cond(uniform(seed) < prob, lambda: tf.reverse(img, axis=[1]), lambda: img)


# ----------------------------------------------------------------------------------------- colour ops


def grayscale(img):
  """PIL convert('L') (ITU-R 601-2 luma, rounded), as a float [H, W, 1] on the uint8 grid."""
  l = img[..., 0:1] * 0.299 + img[..., 1:2] * 0.587 + img[..., 2:3] * 0.114
  return tf.round(l)


def blend(degenerate, img, factor):
  """PIL ImageEnhance: degenerate + factor * (img - degenerate), clipped to [0, 255]."""
  return tf.round(tf.clip_by_value(degenerate + factor * (img - degenerate), 0.0, 255.0))


def solarize(img, threshold=128.0):
  """PIL ImageOps.solarize: invert every pixel value >= threshold."""
  return tf.where(img >= threshold, 255.0 - img, img)


def gaussian_kernel(sigma, radius: int):
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  return k / tf.reduce_sum(k)


def gaussian_blur(img, sigma, radius: int = 6):
  """Separable Gaussian blur (symmetric padding); radius 6 covers 3 sigma for sigma <= 2 (DeiT III range)."""
  k = gaussian_kernel(sigma, radius)
  x = tf.pad(img, [[radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
  x = tf.transpose(x, [2, 0, 1])[..., None]  # channels as batch: [3, H, W, 1]
  x = tf.nn.conv2d(x, tf.reshape(k, [-1, 1, 1, 1]), 1, "VALID")
  x = tf.nn.conv2d(x, tf.reshape(k, [1, -1, 1, 1]), 1, "VALID")
  return tf.round(tf.clip_by_value(tf.transpose(x[..., 0], [1, 2, 0]), 0.0, 255.0))


def adjust_brightness(img, f):
  return blend(tf.zeros_like(img), img, f)


def adjust_contrast(img, f):
  mean = tf.round(tf.reduce_mean(grayscale(img)))
  return blend(tf.fill(tf.shape(img), mean), img, f)


def adjust_saturation(img, f):
  return blend(tf.broadcast_to(grayscale(img), tf.shape(img)), img, f)


def color_jitter(img, seed, brightness=0.0, contrast=0.0, saturation=0.0):
  """torchvision ColorJitter (no hue): each enabled factor ~ U(max(0, 1 - x), 1 + x), ops in random order."""
  s_perm, s_b, s_c, s_s = split_seed(seed, 4)
  fb = uniform(s_b, (), max(0.0, 1 - brightness), 1 + brightness)
  fc = uniform(s_c, (), max(0.0, 1 - contrast), 1 + contrast)
  fs = uniform(s_s, (), max(0.0, 1 - saturation), 1 + saturation)
  order = tf.random.experimental.stateless_shuffle(tf.range(3), s_perm)
  branches = [
      (lambda x: adjust_brightness(x, fb)) if brightness > 0 else (lambda x: x),
      (lambda x: adjust_contrast(x, fc)) if contrast > 0 else (lambda x: x),
      (lambda x: adjust_saturation(x, fs)) if saturation > 0 else (lambda x: x),
  ]
  for i in range(3):
    img = tf.switch_case(order[i], [lambda f=f: f(img) for f in branches])
  return img


def three_augment(img, seed):
  """DeiT III 3-Augment: exactly one of grayscale / solarize / Gaussian blur, chosen uniformly."""
  s_choice, s_sigma = split_seed(seed, 2)
  choice = tf.random.stateless_uniform((), s_choice, 0, 3, dtype=tf.int32)
  sigma = uniform(s_sigma, (), 0.1, 2.0)
  return tf.switch_case(choice, [
      lambda: tf.broadcast_to(grayscale(img), tf.shape(img)),
      lambda: solarize(img, 128.0),
      lambda: gaussian_blur(img, sigma),
  ])


# ----------------------------------------------------------------------------------- tensor-space ops


def normalize(img, mean, std):
  mean = tf.constant(mean, tf.float32) * 255.0
  std = tf.constant(std, tf.float32) * 255.0
  return (img - mean) / std


def erasing_box(seed, height: int, width: int, prob=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                attempts: int = 10):
  """timm RandomErasing box: returns (apply, top, left, h, w); apply is False when skipped or no fit."""
  s_p, s_area, s_ar, s_top, s_left = split_seed(seed, 5)
  area = float(height * width)
  target = uniform(s_area, [attempts], min_area, max_area) * area
  ar = tf.exp(uniform(s_ar, [attempts], math.log(min_aspect), math.log(1 / min_aspect)))
  h = tf.round(tf.sqrt(target * ar))
  w = tf.round(tf.sqrt(target / ar))
  ok = (w < width) & (h < height)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  h, w = h[first], w[first]
  top = tf.floor(uniform(s_top) * (height - h + 1.0))  # randint(0, H - h) inclusive
  left = tf.floor(uniform(s_left) * (width - w + 1.0))
  apply = (uniform(s_p) < prob) & tf.reduce_any(ok)
  return (apply,) + tuple(tf.cast(v, tf.int32) for v in (top, left, h, w))


def random_erasing(img, seed, prob=0.25, mode="pixel"):
  """timm RandomErasing (count 1) on a normalized [H, W, C] image; 'pixel' fills N(0, 1) per value."""
  height, width = img.shape[0], img.shape[1]
  s_box, s_fill = split_seed(seed, 2)
  apply, top, left, h, w = erasing_box(s_box, height, width, prob)
  if mode == "pixel":
    fill = tf.random.stateless_normal(tf.shape(img), s_fill)
  elif mode == "rand":
    fill = tf.broadcast_to(tf.random.stateless_normal([1, 1, img.shape[2]], s_fill), tf.shape(img))
  elif mode == "const":
    fill = tf.zeros_like(img)
  else:
    raise ValueError(f"Unknown random-erasing mode {mode!r}: use 'pixel', 'rand' or 'const'.")
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & apply
  return tf.where(box, fill, img)
