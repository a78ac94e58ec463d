"""The evaluation pixels are torchvision's: real photos through the real folder-dataset eval path against
``Resize(int(224 / crop_pct), interpolation) + CenterCrop(224) + ToTensor + Normalize`` on PIL-decoded images
(what timm's ``create_transform(..., is_training=False)`` builds); PIL-exact resampling and JPEG decoding.

The photos are scikit-learn's shipped sample images (china.jpg, flower.jpg, 640 x 427) as they are, plus crops
of them re-encoded by PIL at several qualities, chroma subsamplings and sizes (non-square, more than twice as
tall as wide, smaller than the resize target so it upsamples, gray, progressive, and one PNG).
"""
import io
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax_fix import data
from vit_jax_fix.data import transforms as T
from vit_jax_fix.interop.torch_compat import import_timm

# (name, source photo, crop box (None: the original file), resize the crop to (w, h) first, save options, gray)
_VARIANTS = [
    ("china_original", 0, None, None, None, False),
    ("flower_original", 1, None, None, None, False),
    ("china_q95_444", 0, (40, 20, 600, 400), None, dict(quality=95, subsampling=0), False),
    ("flower_q75_420", 1, (0, 50, 500, 377), None, dict(quality=75, subsampling=2), False),
    ("china_q30_422_wide", 0, (10, 100, 630, 300), None, dict(quality=30, subsampling=1), False),
    # 270 x 580, more than twice as tall as wide: shrinking it, Pillow >= 13 runs the vertical pass first
    ("flower_q85_tall", 1, (200, 0, 380, 427), (270, 580), dict(quality=85), False),
    ("china_q60_small", 0, (300, 200, 390, 261), None, dict(quality=60), False),  # 90 x 61: enlarged
    ("flower_q90_odd", 1, (13, 7, 270, 264), None, dict(quality=90, progressive=True), False),  # 257 x 257
    ("china_q80_gray", 0, (100, 0, 500, 427), None, dict(quality=80), True),
    ("flower_png", 1, (100, 30, 400, 330), None, "png", False),
]
CASES = [("bicubic", 0.875), ("bilinear", 0.9), ("bicubic", 1.0)]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """root/<variant>/<file>: one image per class, so an eval label names its file. Returns (root, data_dir)."""
  from sklearn.datasets import load_sample_images
  sources = load_sample_images().filenames  # paths of the shipped JPEGs: china.jpg, flower.jpg
  base = tmp_path_factory.mktemp("eval_pixels")
  root = base / "photos"
  for name, src, box, size, options, gray in _VARIANTS:
    os.makedirs(root / name)
    if box is None:
      shutil.copy(sources[src], root / name / "img.jpg")  # the file's own bytes
      continue
    img = Image.open(sources[src]).crop(box)
    if size:
      img = img.resize(size, Image.LANCZOS)
    if gray:
      img = img.convert("L")
    if options == "png":
      img.save(root / name / "img.png")
    else:
      img.save(root / name / "img.jpg", "JPEG", **options)
  return str(root), str(base / "tfds")


def _files(root):
  """Image path per label (classes sorted by name, as the folder builder numbers them)."""
  return [os.path.join(root, name, os.listdir(os.path.join(root, name))[0]) for name in sorted(os.listdir(root))]


def _pipeline_images(folder, interpolation, crop_pct):
  root, data_dir = folder
  cfg = data.default_data_config()
  cfg.dataset, cfg.folder, cfg.data_dir, cfg.eval_split = "folder", root, data_dir, "train"
  cfg.image_size, cfg.interpolation, cfg.crop_pct = 224, interpolation, crop_pct
  cfg.mean, cfg.std = T.IMAGENET_MEAN, T.IMAGENET_STD
  out = {}
  for batch in data.build_eval_iterator(cfg, global_batch_size=4):
    for img, label, mask in zip(batch["image"], batch["label"], batch["mask"]):
      if mask:
        out[int(label)] = img
  return out


def _torchvision_transform(interpolation, crop_pct):
  import_timm()  # makes torchvision importable next to the CPU torch (see torch_compat)
  from torchvision import transforms as TV
  mode = {"bicubic": TV.InterpolationMode.BICUBIC, "bilinear": TV.InterpolationMode.BILINEAR}[interpolation]
  return TV.Compose([TV.Resize(int(224 / crop_pct), interpolation=mode), TV.CenterCrop(224), TV.ToTensor(),
                     TV.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])


def _levels(ours, ref):
  """|ours - ref| in uint8 levels (one level = 1 / 255 / std in normalised units)."""
  return np.rint(np.abs(ours - ref) * 255.0 * np.asarray(T.IMAGENET_STD, np.float32))


@pytest.mark.parametrize("interpolation,crop_pct", CASES)
def test_eval_pixels_equal_torchvision(photo_folder, interpolation, crop_pct):
  """Measured: every value equal (to the float32 rounding of the normalisation, < 1e-6). With the fast-DCT
  decode and the one-pass float resize that this replaced, 20-31% of the values were more than a level off."""
  ours = _pipeline_images(photo_folder, interpolation, crop_pct)
  files = _files(photo_folder[0])
  assert sorted(ours) == list(range(len(_VARIANTS)))
  transform = _torchvision_transform(interpolation, crop_pct)
  off = {}
  for label, path in enumerate(files):
    with Image.open(path) as im:
      ref = transform(im.convert("RGB")).numpy().transpose(1, 2, 0)
    assert ours[label].shape == ref.shape == (224, 224, 3), path
    levels = _levels(ours[label], ref)
    if levels.max() > 0 or np.abs(ours[label] - ref).max() > 1e-5:
      off[os.path.basename(os.path.dirname(path))] = (float(np.mean(levels > 0)), float(levels.max()))
  assert not off, f"(share of values off, max levels off) per image: {off}"


def test_torchvision_reference_is_timms_eval_transform(photo_folder):
  """The reference above is what timm builds for evaluation (so timm-evaluated weights see these pixels)."""
  import_timm()
  from timm.data import create_transform
  path = _files(photo_folder[0])[0]
  for interpolation, crop_pct in CASES:
    with Image.open(path) as im:
      im = im.convert("RGB")
      ref = _torchvision_transform(interpolation, crop_pct)(im).numpy()
      tm = create_transform(224, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD)(im).numpy()
    np.testing.assert_array_equal(tm, ref)


# --------------------------------------------------------------------------------------- the parts alone


def _photo(index=0):
  from sklearn.datasets import load_sample_images
  return load_sample_images().images[index]


@pytest.mark.parametrize("method,pil_method", [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
def test_pil_resize_equals_pillow(method, pil_method):
  """T.pil_resize == Image.resize exactly, on random and photo images, shrinking and enlarging either axis
  (bicubic overshoots, so the uint8 rounding and clipping between the passes, and their order, show)."""
  rng = np.random.RandomState(0)
  photo = _photo(1)
  sizes = [((37, 53), (20, 31)), ((40, 30), (97, 61)), ((64, 64), (64, 20)), ((50, 70), (11, 140)),
           ((200, 60), (80, 50)), ((200, 60), (80, 24)), ((31, 200), (50, 10)), ((1, 9), (5, 1)),
           ((9, 1), (1, 5)), ((427, 640), (256, 383)), ((427, 640), (224, 224)), ((120, 90), (120, 91))]
  for k, ((h, w), (oh, ow)) in enumerate(sizes):
    x = rng.randint(0, 256, (h, w, 3), dtype=np.uint8) if k % 2 else photo[:h, :w]
    ref = np.asarray(Image.fromarray(np.ascontiguousarray(x)).resize((ow, oh), pil_method))
    out = T.pil_resize(tf.constant(x), (oh, ow), method)
    assert out.shape == (oh, ow, 3)
    np.testing.assert_array_equal(out.numpy(), ref, err_msg=f"{(h, w)} -> {(oh, ow)}")
  # Graph mode with dynamic sizes, as inside tf.data.
  fn = tf.function(lambda img, size: T.pil_resize(img, size, method),
                   input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int32)])
  x = rng.randint(0, 256, (45, 77, 3), dtype=np.uint8)
  np.testing.assert_array_equal(fn(x, tf.constant([33, 100])).numpy(),
                                np.asarray(Image.fromarray(x).resize((100, 33), pil_method)))


def test_jpeg_decode_equals_pil_also_cropped():
  """decode_image (eval) and decode_crop (training: random-resized-crop windows) equal PIL's decode: the
  accurate DCT, and chroma at the crop window's edges as in the full image (subsampled JPEGs)."""
  rng = np.random.RandomState(1)
  for index in (0, 1):
    for options in (dict(quality=95, subsampling=0), dict(quality=70, subsampling=1),
                    dict(quality=40, subsampling=2, progressive=True)):
      buf = io.BytesIO()
      Image.fromarray(_photo(index)[50:250, 30:331]).save(buf, "JPEG", **options)
      enc = buf.getvalue()
      ref = np.asarray(Image.open(io.BytesIO(enc)).convert("RGB"))
      np.testing.assert_array_equal(T.decode_image(tf.constant(enc)).numpy(), ref)
      fast = tf.io.decode_image(enc, channels=3).numpy()
      assert np.mean(fast != ref) > 0.2  # the fast DCT is really different: this check would notice it
      for i in range(12):
        top, left = rng.randint(0, 199), rng.randint(0, 300)
        left = left // 16 * 16 if i % 3 == 0 else left  # a window starting on an MCU edge
        h, w = rng.randint(1, 201 - top), rng.randint(1, 302 - left)
        crop = T.decode_crop(tf.constant(enc), top, left, h, w).numpy()
        np.testing.assert_array_equal(crop, ref[top:top + h, left:left + w], err_msg=f"{(top, left, h, w)}")
