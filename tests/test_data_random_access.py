"""Random-access reading (array_record): resuming late in an epoch reads no earlier record and gives the batches
of the tfrecord path (whose resume equals an uninterrupted run, tests/test_data_pipeline.py), one host and
DeiT's global repeated augmentation across two; the fallbacks when array_record cannot be used."""
import io
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vit_jax_fix import data
from vit_jax_fix.data import pipeline
from vit_jax_fix.data import sources
from vit_jax_fix.errors import ConfigError

N = 300  # examples: an epoch of many read chunks (READ_CHUNK = 64)
BATCH = 8

pytestmark = pytest.mark.skipif(not sources.has_array_record(), reason="needs the array_record package")


class _Tiny(tfds.core.GeneratorBasedBuilder):
  """N distinct 8 x 8 images (label = index % 10)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(N), "test": self._generate_examples(21)}

  def _generate_examples(self, n):
    from PIL import Image
    rng = np.random.RandomState(n)
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
      yield i, {"image": buf.getvalue(), "label": i % 10}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """{format: prepared dataset directory} of the same examples."""
  out = {}
  for fmt in ("tfrecord", "array_record"):
    builder = _Tiny(data_dir=str(tmp_path_factory.mktemp(fmt)), file_format=fmt)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    out[fmt] = builder.data_dir
  return out


def _cfg(data_dir, **kw):
  c = data.default_data_config()
  c.dataset = "from_data_dir"
  c.data_dir = data_dir
  c.image_size = 8
  c.shuffle_buffer = 50
  c.rand_augment = ""  # DeiT's crop, flip, colour jitter and erasing, keyed by position; RandAugment only adds tracing
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture
def reads(monkeypatch):
  """The index chunks the random-access reader is asked for, one tuple per read."""
  seen = []
  read = sources.RecordReader.read

  def counting(self, indices):
    seen.append(tuple(np.asarray(indices).tolist()))
    return read(self, indices)
  monkeypatch.setattr(sources.RecordReader, "read", counting)
  return seen


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_late_resume_reads_from_the_position_on_and_matches_tfrecord(prepared, reads, caplog, process_index,
                                                                     process_count):
  kw = dict(global_batch_size=BATCH * process_count, seed=5, process_index=process_index,
            process_count=process_count)
  length = data.epoch_length(N, 3, process_count=process_count,
                             scope="global" if process_count > 1 else "host")
  start = length // BATCH - 2  # near the end of epoch 0: 2 batches, then epoch 1
  offset = start * BATCH
  with caplog.at_level(logging.INFO, logger=pipeline.__name__):
    it = data.build_train_iterator(_cfg(prepared["array_record"]), start_step=start, **kw)
    got = [next(it) for _ in range(3)]
  assert any("random access" in r.message for r in caplog.records)
  # Every read is a chunk of the stream from the position on (the rest of epoch 0, then epoch 1 ...): the
  # records before it were never asked for.
  cfg = pipeline._resolve(_cfg(prepared["array_record"]))
  host_seed = pipeline._host_seed(5, process_index)
  shared = (pipeline._host_seed(5, pipeline.SHARED_STREAM), 1, 2) if process_count > 1 else None
  orders, _ = pipeline._epoch_orders(N if shared else N, cfg, host_seed, shared)
  stream = list(pipeline._index_chunks(orders, length, 0, offset).take(40).as_numpy_iterator())
  assert stream[0][1][0] == offset and stream[0][1][-1] == length - 1  # positions: the rest of epoch 0
  ahead = {tuple(idx.tolist()) for idx, _ in stream}
  assert reads and set(reads) <= ahead and tuple(stream[0][0].tolist()) in reads
  before = list(pipeline._index_chunks(orders, length, 0, 0).take(offset // pipeline.READ_CHUNK).as_numpy_iterator())
  assert not {tuple(idx.tolist()) for idx, _ in before} & set(reads)
  with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
    it = data.build_train_iterator(_cfg(prepared["tfrecord"]), start_step=start, **kw)
    want = [next(it) for _ in range(3)]
  assert any("stored as tfrecord" in r.message for r in caplog.records)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["label"], w["label"])


def test_epoch_order_is_the_record_stream_order(prepared):
  """The index sampler reproduces the record stream's permutation + shuffle buffer + repeats (seen by labels)."""
  cfg = pipeline._resolve(_cfg(prepared["array_record"]))
  orders, length = pipeline._epoch_orders(N, cfg, host_seed=7)
  order = next(iter(orders(np.int64(1))))
  base = tfds.builder_from_directory(prepared["tfrecord"])
  one_epoch, length2 = pipeline._epoch_stream(pipeline._read(base, "train", cfg).take(N), N, cfg, host_seed=7)
  labels = [int(lab) for _, _, lab in one_epoch(np.int64(1)).as_numpy_iterator()]
  label_of_index = np.array([int(lab) for _, lab in pipeline._read(base, "train", cfg).as_numpy_iterator()])
  assert length == length2 == len(order)
  assert label_of_index[order.numpy()].tolist() == labels
  assert np.bincount(order.numpy(), minlength=N).max() == 3  # each kept image 3 times


def test_eval_reads_array_record_only_datasets(prepared):
  kw = dict(global_batch_size=8, process_index=0, process_count=1)
  got = list(data.build_eval_iterator(_cfg(prepared["array_record"], eval_split="test"), **kw))
  want = list(data.build_eval_iterator(_cfg(prepared["tfrecord"], eval_split="test"), **kw))
  assert len(got) == len(want) == 3
  for g, w in zip(got, want):
    for k in ("image", "label", "mask"):
      np.testing.assert_array_equal(g[k], w[k])


def test_without_the_package_array_record_falls_back_or_says_what_to_install(prepared, monkeypatch, caplog):
  monkeypatch.setattr(sources, "has_array_record", lambda: False)
  with caplog.at_level(logging.WARNING, logger=sources.__name__):
    assert sources.prepare_file_format("array_record") == "tfrecord"
  assert "pip install array_record" in caplog.text
  with pytest.raises(sources.DataSourceError, match="pip install array_record"):
    next(data.build_train_iterator(_cfg(prepared["array_record"]), global_batch_size=8, seed=0))
  with pytest.raises(ConfigError, match="file_format"):
    next(data.build_train_iterator(_cfg(prepared["tfrecord"], file_format="parquet"), global_batch_size=8,
                                   seed=0))
