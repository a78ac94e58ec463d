"""Augmentation ops against their definitions (PIL / scipy / torchvision semantics), on small images."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from vit_jax_fix.data import randaugment as RA
from vit_jax_fix.data import transforms as T


def _img(seed=0, h=17, w=23):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _tf(x):
  return tf.constant(np.asarray(x, np.float32))


def _pil(x):
  return Image.fromarray(np.asarray(x, np.uint8))


def _seed(*v):
  return tf.constant(v if len(v) == 2 else (v[0], 0), tf.int64)


def _close(a, b, tol=1):
  diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  assert diff.max() <= tol, f"max diff {diff.max()}"


# ------------------------------------------------------------------- colour ops vs the PIL functions timm uses


@pytest.mark.parametrize("seed", [0, 1])
def test_pil_point_ops(seed):
  x = _img(seed)
  _close(RA.auto_contrast(_tf(x)), ImageOps.autocontrast(_pil(x)))
  _close(RA.equalize(_tf(x)), ImageOps.equalize(_pil(x)))
  _close(RA.invert(_tf(x)), ImageOps.invert(_pil(x)), 0)
  for bits in (1, 3, 4):
    _close(RA.posterize(_tf(x), bits), ImageOps.posterize(_pil(x), bits), 0)
  for thr in (0, 77, 128, 256):
    _close(T.solarize(_tf(x), float(thr)), ImageOps.solarize(_pil(x), thr), 0)
  lut = [min(255, i + 40) if i < 128 else i for i in range(256)]
  _close(RA.solarize_add(_tf(x), 40.0), _pil(x).point(lut * 3), 0)


def test_autocontrast_and_equalize_on_low_contrast_image():
  x = (_img(3) // 4 + 60).astype(np.uint8)  # values in [60, 123]: both ops must change it
  out = np.asarray(RA.auto_contrast(_tf(x)))
  assert out.min() == 0 and out.max() == 255
  _close(out, ImageOps.autocontrast(_pil(x)))
  _close(RA.equalize(_tf(x)), ImageOps.equalize(_pil(x)))


@pytest.mark.parametrize("factor", [0.1, 0.55, 1.0, 1.9])
def test_enhance_ops(factor):
  x = _img(2)
  _close(T.adjust_brightness(_tf(x), factor), ImageEnhance.Brightness(_pil(x)).enhance(factor))
  _close(T.adjust_saturation(_tf(x), factor), ImageEnhance.Color(_pil(x)).enhance(factor))
  _close(T.adjust_contrast(_tf(x), factor), ImageEnhance.Contrast(_pil(x)).enhance(factor))
  _close(RA.sharpness(_tf(x), factor), ImageEnhance.Sharpness(_pil(x)).enhance(factor))


def test_grayscale_matches_pil_luma():
  x = _img(4)
  _close(T.grayscale(_tf(x))[..., 0], _pil(x).convert("L"))


def test_translate_and_rotate_geometry():
  x = _img(5, 16, 16)
  fill = (124, 116, 104)
  # Translate by +3 px in x: output column j samples input column j + 3; the right 3 columns are filled.
  out = np.asarray(RA.affine(_tf(x), (1.0, 0.0, 3.0, 0.0, 1.0, 0.0), fill))
  np.testing.assert_array_equal(out[:, :-3], x[:, 3:])
  np.testing.assert_array_equal(out[:, -3:], np.broadcast_to(np.array(fill, np.float32), (16, 3, 3)))
  np.testing.assert_array_equal(np.asarray(RA.rotate(_tf(x), 0.0, fill)), x)
  # 90 degrees counter-clockwise, like PIL's rotate(90) on a square image.
  _close(RA.rotate(_tf(x), 90.0, fill), _pil(x).rotate(90), 0)


def _smooth(seed, h, w):
  """A photo-like image: upsampled noise (flat patches and gradients, where truncation would show)."""
  small = np.random.RandomState(seed).randint(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
  return np.asarray(_pil(small).resize((w, h), Image.BICUBIC))


PIL_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "nearest"])
def test_affine_matches_pillow_transform(method):
  """RA.affine / RA.rotate against Image.transform(AFFINE) / Image.rotate with the same resample and fill:
  timm's geometric ops. Measured: identical except a few pixels one level apart (float32 interpolation
  truncating where Pillow's double lands within rounding of an integer); nearest differs at rare ties."""
  fill = (124, 116, 104)
  diffs = []
  for k, (h, w) in enumerate([(29, 37), (48, 40)]):
    for x in (_img(10 + k, h, w), _smooth(20 + k, h, w)):
      cases = [(1, 0.27, 0, 0, 1, 0), (1, -0.19, 0, 0, 1, 0), (1, 0, 0, 0.23, 1, 0),  # shear x, y
               (1, 0, -0.41 * w, 0, 1, 0), (1, 0, 0, 0, 1, 0.37 * h), (1, 0, 3, 0, 1, 0),  # translate x, y
               (0.9, 0.2, 1.5, -0.3, 1.1, 2.0)]  # general (scale + shear)
      for m in cases:
        ref = Image.fromarray(x).transform((w, h), Image.AFFINE, m, resample=PIL_RESAMPLE[method], fillcolor=fill)
        diffs.append(np.asarray(RA.affine(_tf(x), m, fill, method)) - np.asarray(ref, np.float32))
      for deg in (17.0, -28.5, 90.0):
        ref = Image.fromarray(x).rotate(deg, resample=PIL_RESAMPLE[method], fillcolor=fill)
        diffs.append(np.asarray(RA.rotate(_tf(x), deg, fill, method)) - np.asarray(ref, np.float32))
  d = np.abs(np.concatenate([v.ravel() for v in diffs]))
  if method == "nearest":
    assert np.mean(d > 0) < 0.002
  else:
    assert d.max() <= 1 and d.mean() < 0.01, (d.max(), d.mean())
  # The methods really differ (the test would not notice a wrong kernel otherwise).
  x = _smooth(3, 32, 32)
  outs = {m: np.asarray(RA.rotate(_tf(x), 13.0, fill, m)) for m in PIL_RESAMPLE}
  assert np.abs(outs["bicubic"] - outs["bilinear"]).mean() > 0.3


def test_pillow_affine_bicubic_is_cubic_convolution_a_minus_1():
  """The definition, checked independently of RA: a half-pixel shift of a 1-D step with Pillow's BICUBIC
  transform gives the a = -1 kernel weights (-1/8, 5/8, 5/8, -1/8), not a = -0.5's (-1/16, 9/16, 9/16, -1/16)."""
  row = np.array([0, 0, 0, 160, 160, 160, 160, 160], np.uint8)
  x = np.repeat(np.repeat(row[None, :, None], 4, 0), 3, 2)
  out = np.asarray(_pil(x).transform((8, 4), Image.AFFINE, (1, 0, 0.5, 0, 1, 0), resample=Image.BICUBIC))
  # output x=2 samples between columns 2 and 3: 160 * (5/8 - 1/8) = 80; x=1: 160 * (-1/8) -> clipped to 0;
  # x=3: 160 * (5/8 + 5/8 - 1/8) = 180 (a = -0.5 would give 170).
  assert out[0, 1:4, 0].tolist() == [0, 80, 180]
  ours = np.asarray(RA.affine(_tf(x), (1, 0, 0.5, 0, 1, 0), (0, 0, 0), "bicubic"))
  np.testing.assert_array_equal(ours, out)


def test_randaugment_interpolation_follows_timm():
  assert RA.timm_interpolation("bicubic") == "bicubic" and RA.timm_interpolation("bilinear") == "bilinear"
  assert RA.timm_interpolation("random") == "random" and RA.timm_interpolation(None) == "random"
  assert RA.timm_interpolation("lanczos3") == "bicubic"  # Pillow's transform has no lanczos; timm's default
  with pytest.raises(ValueError, match="interpolation"):
    RA.RandAugment("rand-m9", interpolation="area")
  # 'random': each op application draws bilinear or bicubic from a stream that leaves the op, magnitude and
  # sign draws unchanged, so with one geometric op per image (n1, p1) every output equals the all-bilinear or
  # the all-bicubic one, and both occur.
  x = _tf(_smooth(4, 24, 24))
  ras = [RA.RandAugment("rand-m9-mstd0.5-n1-p1", interpolation=m, ops=("Rotate", "ShearX", "TranslateYRel"))
         for m in ("random", "bilinear", "bicubic")]

  rnd, bil, bic = ([np.asarray(ra(x, _seed(s, 11))) for s in range(20)] for ra in ras)  # eager: no tracing
  as_bil = [np.array_equal(r, b) for r, b in zip(rnd, bil)]
  as_bic = [np.array_equal(r, c) for r, c in zip(rnd, bic)]
  assert not any(np.array_equal(b, c) for b, c in zip(bil, bic))
  assert all(p != q for p, q in zip(as_bil, as_bic)) and sum(as_bil) >= 3 and sum(as_bic) >= 3
  np.testing.assert_array_equal(np.asarray(ras[0](x, _seed(7, 11))), rnd[7])  # deterministic for a fixed seed
  draws = [int(ras[0].interpolation_index(tf.constant([s, 5], tf.int64))) for s in range(64)]
  assert set(draws) == {1, 2} and 16 <= draws.count(2) <= 48  # bilinear / bicubic, about half each


def test_randaugment_parses_timm_strings_and_is_seeded():
  cfg = RA.parse_config("rand-m9-mstd0.5-inc1")
  assert cfg["magnitude"] == 9 and cfg["magnitude_std"] == 0.5 and cfg["num_layers"] == 2
  assert cfg["ops"] == RA.INCREASING_OPS and cfg["prob"] == 0.5
  with pytest.raises(ValueError, match="rand-"):
    RA.parse_config("m9-n2")
  with pytest.raises(ValueError, match="Unsupported"):
    RA.parse_config("rand-m9-zz3")
  ra = RA.RandAugment("rand-m9-mstd0.5-inc1")
  x = _tf(_img(6, 24, 24))
  outs = [np.asarray(ra(x, _seed(s))) for s in range(12)]
  np.testing.assert_array_equal(outs[0], np.asarray(ra(x, _seed(0))))  # same seed, same result
  assert sum(not np.array_equal(o, np.asarray(x)) for o in outs) >= 6  # P(unchanged) = 1/4 per image
  assert all(o.min() >= 0 and o.max() <= 255 and np.array_equal(o, np.round(o)) for o in outs)


# ------------------------------------------------------------------------------------------- DeiT III ops


def test_gaussian_blur_matches_scipy():
  from scipy import ndimage
  x = _img(7, 20, 20).astype(np.float32)
  for sigma in (0.5, 1.3, 2.0):
    out = np.asarray(T.gaussian_blur(_tf(x), tf.constant(sigma)))
    ref = np.stack([ndimage.gaussian_filter(x[..., c], sigma, mode="reflect", truncate=6.0 / sigma)
                    for c in range(3)], -1)
    _close(out, np.round(ref))


def test_three_augment_applies_exactly_one_of_three_ops():
  x = _img(8, 20, 20)
  gray = np.broadcast_to(np.asarray(T.grayscale(_tf(x))), x.shape)
  sol = np.asarray(T.solarize(_tf(x), 128.0))
  seen = set()
  for s in range(30):
    out = np.asarray(T.three_augment(_tf(x), _seed(s)))
    if np.array_equal(out, gray):
      seen.add("gray")
    elif np.array_equal(out, sol):
      seen.add("solarize")
    else:  # a blur: smoother than the input, same mean
      assert np.abs(np.diff(out, axis=0)).mean() < np.abs(np.diff(x.astype(float), axis=0)).mean()
      assert abs(out.mean() - x.mean()) < 3
      seen.add("blur")
  assert seen == {"gray", "solarize", "blur"}


def test_color_jitter_factors_and_identity():
  x = _tf(_img(9))
  np.testing.assert_array_equal(np.asarray(T.color_jitter(x, _seed(1), 0.0, 0.0, 0.0)), np.asarray(x))
  # brightness only: out = round(clip(f * x)) for one f in [0.7, 1.3]
  out = np.asarray(T.color_jitter(x, _seed(2), 0.3, 0.0, 0.0))
  xs = np.asarray(x)
  m = (xs > 20) & (out < 255)
  f = np.median(out[m] / xs[m])
  assert 0.7 <= f <= 1.3
  _close(out, np.clip(np.round(f * xs), 0, 255), 1)


# ---------------------------------------------------------------------------------------- erasing / crops


def test_random_erasing_changes_only_the_chosen_box():
  x = tf.random.stateless_normal([32, 24, 3], [0, 1])
  changed_any = 0
  for s in range(20):
    seed = _seed(s)
    out = np.asarray(T.random_erasing(x, seed, prob=0.5))
    s_box, _ = T.split_seed(seed, 2)
    apply, top, left, h, w = (int(v) for v in T.erasing_box(s_box, 32, 24, 0.5))
    diff = np.any(out != np.asarray(x), axis=-1)
    box = np.zeros_like(diff)
    if apply:
      box[top:top + h, left:left + w] = True
      area = h * w / (32 * 24)
      assert 0.015 <= area <= 1 / 3 + 0.05 and h < 32 and w < 24
      changed_any += 1
    np.testing.assert_array_equal(diff, box)  # exactly the box changes (pixel mode: fresh N(0,1) values)
  assert 3 <= changed_any <= 17


def test_rrc_window_is_valid_and_follows_scale_and_ratio():
  hs, ws = [], []
  for s in range(200):
    top, left, h, w = (int(v) for v in T.rrc_window(_seed(s), 300, 400))
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
    hs.append(h)
    ws.append(w)
  area = np.array(hs) * np.array(ws) / (300 * 400)
  ratio = np.array(ws) / np.array(hs)
  assert area.min() >= 0.07 and area.max() <= 1.0 and area.min() < 0.2 and area.max() > 0.7
  assert ratio.min() >= 0.74 and ratio.max() <= 1.34
  # An extreme aspect ratio falls back to the ratio-clamped centre crop.
  top, left, h, w = (int(v) for v in T.rrc_window(_seed(0), 10, 1000, scale=(0.9, 1.0)))
  assert (h, w) == (10, round(10 * 4 / 3)) and left == (1000 - w) // 2


def _encode(x, fmt="PNG"):
  buf = io.BytesIO()
  _pil(x).save(buf, format=fmt)
  return tf.constant(buf.getvalue())


def test_eval_resize_center_crop_uses_crop_pct():
  # A 64x48 image with a marker grid; crop_pct 0.875 at 28 px: resize short side to 32, centre crop 28.
  x = np.zeros((64, 48, 3), np.uint8)
  x[:, 24:] = 255  # right half white
  out = np.asarray(T.eval_resize_crop(_encode(x), 28, 0.875, "bilinear"))
  assert out.shape == (28, 28, 3)
  # the short side 48 -> 32 (scale 2/3), height 64 -> 42; crop offset (32 - 28) / 2 = 2 columns:
  # the white edge sits at column 16 - 2 = 14 of the crop.
  assert out[:, :13].max() < 30 and out[:, 15:].min() > 225
  full = np.asarray(T.eval_resize_crop(_encode(x), 32, 1.0, "bilinear"))
  assert full.shape == (32, 32, 3) and full[:, :15].max() < 30 and full[:, 17:].min() > 225


def test_decode_handles_gray_cmyk_and_16bit():
  gray = _img(1)[..., 0]
  out = np.asarray(T.decode_image(_encode(gray)))
  assert out.shape == gray.shape + (3,) and np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)
  sixteen = io.BytesIO()
  Image.fromarray(gray.astype(np.uint16) * 257).save(sixteen, format="PNG")
  out16 = np.asarray(T.decode_image(tf.constant(sixteen.getvalue())))
  _close(out16[..., 0], gray, 1)
  cmyk = io.BytesIO()
  _pil(_img(2)).convert("CMYK").save(cmyk, format="JPEG", quality=95)
  outc = np.asarray(T.decode_image(tf.constant(cmyk.getvalue())))
  assert outc.shape == (17, 23, 3)
  assert np.abs(outc.astype(float) - np.asarray(Image.open(cmyk).convert("RGB"), float)).mean() < 8


def test_random_resized_crop_jpeg_window_decode_matches_full_decode():
  x = _img(3, 60, 80)
  enc = _encode(x, "PNG")
  out = np.asarray(T.random_resized_crop(enc, _seed(4), 24))
  s_win, _ = T.split_seed(_seed(4), 2)
  top, left, h, w = (int(v) for v in T.rrc_window(s_win, 60, 80))
  ref = np.asarray(T.resize(tf.constant(x[top:top + h, left:left + w]), (24, 24), "bicubic"))
  np.testing.assert_array_equal(out, ref)


def test_normalize_uses_given_mean_std():
  x = _tf(np.full((2, 2, 3), 127.5))
  np.testing.assert_allclose(np.asarray(T.normalize(x, (0.5,) * 3, (0.5,) * 3)), 0.0, atol=1e-6)
  out = np.asarray(T.normalize(x, T.IMAGENET_MEAN, T.IMAGENET_STD))
  np.testing.assert_allclose(out[0, 0], (0.5 - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD), rtol=1e-5)
