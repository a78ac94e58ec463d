"""Offline test helpers: a generated image folder and tfds metadata for mocking imagenet2012.

Nothing here touches the network: the folder is written with PIL and the imagenet2012 metadata is built from
the tfds builder class (``mock_data`` then serves random examples).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np


def solid_color(index: int):
  """A distinct RGB colour per index (< 6**3 = 216): lets tests recover which image a pixel came from."""
  r, g, b = index // 36, (index // 6) % 6, index % 6
  return (r * 51, g * 51, b * 51)


def color_index(rgb) -> int:
  r, g, b = (int(round(float(v) / 51.0)) for v in rgb)
  return r * 36 + g * 6 + b


def make_image_folder(root: str, num_classes: int = 3, per_class: int = 5, size=(40, 30), *, splits=None,
                      odd_modes: bool = False, corrupt: int = 0, solid: bool = False, seed: int = 0) -> list:
  """Writes root/<class>/<i>.jpg (or root/<split>/<class>/...) and returns [(relpath, class_index)].

  solid=True gives each image a unique solid colour (lossless PNG), so its identity survives any resize/crop.
  odd_modes=True adds a gray PNG, a CMYK JPEG, a 16-bit PNG, a palette PNG and an RGBA PNG per class.
  corrupt>0 adds that many truncated/garbage files to the first class.
  """
  from PIL import Image
  rng = np.random.RandomState(seed)
  out, counter = [], 0
  for split in (splits or [None]):
    base = os.path.join(root, split) if split else root
    for c in range(num_classes):
      d = os.path.join(base, f"class_{c:02d}")
      os.makedirs(d, exist_ok=True)
      for i in range(per_class):
        w, h = size
        if solid:
          arr = np.empty((h, w, 3), np.uint8)
          arr[:] = solid_color(counter)
          name = f"img_{i:04d}.png"
        else:
          arr = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
          name = f"img_{i:04d}.jpg"
        Image.fromarray(arr).save(os.path.join(d, name))
        out.append((os.path.relpath(os.path.join(d, name), root), c))
        counter += 1
      if odd_modes:
        w, h = size
        gray = rng.randint(0, 256, (h, w), dtype=np.uint8)
        Image.fromarray(gray, mode="L").save(os.path.join(d, "gray.png"))
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).convert("CMYK").save(
            os.path.join(d, "cmyk.jpg"))
        Image.fromarray(gray.astype(np.uint16) * 257).save(os.path.join(d, "sixteen.png"))
        Image.fromarray(gray).convert("P").save(os.path.join(d, "palette.png"))
        Image.fromarray(rng.randint(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA").save(
            os.path.join(d, "rgba.png"))
        out += [(os.path.relpath(os.path.join(d, f), root), c)
                for f in ("gray.png", "cmyk.jpg", "sixteen.png", "palette.png", "rgba.png")]
    for k in range(corrupt):
      d = os.path.join(base, "class_00")
      path = os.path.join(d, f"corrupt_{k}.jpg")
      with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg" if k % 2 == 0 else b"")
  return out


def write_imagenet_metadata(data_dir: str, train: int = 1000, validation: int = 50):
  """Writes imagenet2012 dataset_info.json with the given split sizes (the tfds offline recipe)."""
  import tensorflow_datasets as tfds
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  splits = tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0, filename_template=None)
      for name, n in (("train", train), ("validation", validation))])
  builder.info.set_splits(splits)
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return builder


class _NoMockFs:
  """Stands in for tfds' MockFs, which mock_data enters around every `as_dataset` call to fake the data dir.
  MockFs redirects *all* file paths of the process while it is active, so an asynchronous Orbax save running
  at that moment in the trainer wrote into the mock tree and failed. With USE_FILES the data dir really
  exists (the metadata is written here), so the fake is not needed."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def add_file(self, *args, **kwargs):
    pass


@contextlib.contextmanager
def mock_imagenet(data_dir: str, train: int = 1000, validation: int = 50, num_examples: int | None = None):
  """imagenet2012 under tfds.testing.mock_data with metadata built here; no files, no network."""
  from unittest import mock

  import tensorflow_datasets as tfds
  write_imagenet_metadata(data_dir, train, validation)
  with mock.patch("tensorflow_datasets.testing.test_utils.MockFs", _NoMockFs), \
      tfds.testing.mock_data(num_examples=num_examples or max(train, validation),
                             policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir):
    yield
