"""Train and eval iterators (tf.data on host) with exact resume.

Config keys (``default_data_config()`` returns them all with their defaults; None means "derive it"):

==================== ============================= =================================================================
key                  default                       meaning
==================== ============================= =================================================================
dataset              'demo'                        tfds name ('imagenet2012', 'cifar10', ...), 'demo' (embedded
                                                   MNIST-5k), 'folder' (image folder) or 'from_data_dir'
data_dir             None                          tfds data dir (None: tfds default for tfds names; the vit_jax_fix
                                                   cache for demo/folder); for 'from_data_dir' the prepared
                                                   <name>/<config>/<version> directory
folder               None                          image-folder root: root/<class>/<img> or root/<split>/<class>/<img>
file_format          None                          format the folder and demo sources are prepared in: 'tfrecord'
                                                   (None) or 'array_record' (random access: resume without reading
                                                   the epoch so far). tfds names come as `tfds build` prepared them
train_split          'train'                       tfds split string, slices allowed ('train[:99%]')
eval_split           None                          None: 'validation' if present, else 'test' (demo: 'test')
image_key, label_key 'image', 'label'              feature names in the tfds dataset
image_size           224                           square train/eval resolution
num_classes          None                          None: from the dataset's label feature
interpolation        None                          'bicubic' | 'bilinear' | 'random' (train: RRC and RandAugment's
                                                   geometric ops, as timm); None: model default. The eval resize
                                                   is PIL's exactly for bicubic/bilinear ('random' evaluates
                                                   bilinear): with the accurate-DCT JPEG decode the eval pixels
                                                   equal torchvision's/timm's. 'nearest', 'area', 'lanczos3':
                                                   tf.image.resize (close to PIL, not equal)
crop_pct             None                          eval resize = floor(size / crop_pct); None: model default
mean, std            None                          normalization (0-1 scale); None: model default (ImageNet)
augment              'deit'                        'deit' (RRC, flip, RandAugment, erasing), '3aug' (DeiT III),
                                                   'none' (eval-style resize + centre crop, no randomness)
scale, ratio         (0.08, 1.0), (3/4, 4/3)       random-resized-crop area and aspect ranges
hflip                0.5                           horizontal flip probability ('deit' and '3aug')
rand_augment         'rand-m9-mstd0.5-inc1'        timm RandAugment string ('' = off); used by 'deit' only
color_jitter         0.3                           'deit': brightness/contrast/saturation jitter, only when
                                                   rand_augment is '' (timm/DeiT); '3aug': applied always
reprob, remode       0.25, 'pixel'                 random erasing probability / fill mode ('deit' only)
simple_random_crop   False                         '3aug': resize + pad-4 random crop instead of RRC (DeiT III src)
repeated_aug         3                             each chosen image appears this many times per epoch, epoch length
                                                   about unchanged (DeiT RASampler); 1 = off
repeated_aug_scope   'global'                      'global': with several processes the copies of an image go to
                                                   different hosts, as RASampler puts them on different ranks;
                                                   'host': each host repeats the images of its own part
shuffle_buffer       10_000                        tf.data shuffle buffer (clipped to the host's split size)
cache                False                         cache the encoded examples in memory (small datasets)
prefetch             2                             batches prefetched on host
mixup, cutmix        0.8, 1.0                      Mixup / CutMix alphas (0 disables) -- applied on device
mixup_switch_prob    0.5                           probability of CutMix when both are on
mixup_prob           1.0                           probability of mixing a batch
mixup_per_device     True                          mix each device's shard on its own (as each GPU does in the
                                                   PyTorch recipes); False mixes the global batch as one
label_smoothing      0.1                           folded into the mixed targets
bce_targets          False                         DeiT III binarised targets (needs label_smoothing 0)
==================== ============================= =================================================================

The mixup keys are read by the trainer, which calls :func:`vit_jax_fix.data.mixup_cutmix` in its jitted step
(see :func:`mixup_kwargs`).

Determinism and exact resume. Each host reads its own ``tfds.even_splits`` part, in file order (tfds files are
already shuffled when prepared). Epoch ``e`` is a pure function of (seed, host, e): with repeated augmentation
a stateless permutation picks ceil(n / r) examples, the epoch's shuffle buffer is seeded with (seed, host, e),
each kept example is repeated r times, and the epoch is cut to exactly ``r * ceil(n / r)`` elements.
Every element then carries its global stream position ``p``; its augmentation uses stateless random ops seeded
with (seed ^ host, p).

Resuming at step s starts at position ``s * local_batch``, and the batches are bit-identical to those of an
uninterrupted run. The order of an epoch depends on the examples' indices only (the permutation, the seeded
shuffle buffer and the repeats never look at a record), so with random access (a dataset prepared as
``array_record``, see :mod:`vit_jax_fix.data.sources`) the epoch's index order is computed on indices alone
(``_epoch_orders``: a buffer shuffle of n integers, a few microseconds per example, whatever the position) and only
the records from the resume position on are read. A ``tfrecord`` dataset is read in file order: its records
flow through the same permutation, shuffle buffer and repeats, and resuming skips the encoded elements before
the position (reading, not decoding, at most one epoch of records; the log says so). Both readers give the same
batches.

Repeated augmentation across hosts (``repeated_aug`` r > 1, ``repeated_aug_scope='global'``, P > 1 processes)
follows DeiT's RASampler: a permutation of the whole split seeded with (seed, e) only, so the same on every host,
lists the images; each is repeated r times consecutively, and host h owns positions h, h + P, h + 2P, ... of
that stream, cut to DeiT's ``floor(n // 256 * 256 / P)`` per host (``floor(n / P)`` for splits under 256
images). The copies of an image thus land on min(r, P) different hosts, each with its own augmentation. Each
host keeps the images that own one of its positions, with their copy counts; a shuffle buffer seeded with
(seed, host, e) orders them, and each is repeated its count times. With random access a host reads only the
records it keeps (at most its epoch length, about n / P, never the rest of the split); from
tfrecord files every host reads the whole split in file order and drops the others before decoding.
``repeated_aug_scope='host'`` reads only the host's part.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax_fix.data import randaugment
from vit_jax_fix.data import sources
from vit_jax_fix.data import transforms as T
from vit_jax_fix.errors import ConfigError

FALLBACK_MODEL_DEFAULTS = dict(mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD, crop_pct=0.875, interpolation="bicubic")
AUGMENTS = ("deit", "3aug", "none")
INTERPOLATIONS = ("bicubic", "bilinear", "random", "nearest", "area", "lanczos3")
REPEAT_SCOPES = ("global", "host")
RASAMPLER_MULTIPLE = 256  # DeiT's RASampler keeps floor(n // 256 * 256 / world) indices per rank and epoch
READ_CHUNK = 64  # records per random-access read: large enough for the reader's parallelism, small for latency

log = logging.getLogger(__name__)


def default_data_config() -> ml_collections.ConfigDict:
  """All data keys with their defaults (the module docstring documents each)."""
  c = ml_collections.ConfigDict()
  c.dataset = "demo"
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.folder = ml_collections.config_dict.placeholder(str)
  c.file_format = ml_collections.config_dict.placeholder(str)
  c.train_split = "train"
  c.eval_split = ml_collections.config_dict.placeholder(str)
  c.image_key = "image"
  c.label_key = "label"
  c.image_size = 224
  c.num_classes = ml_collections.config_dict.placeholder(int)
  c.interpolation = ml_collections.config_dict.placeholder(str)
  c.crop_pct = ml_collections.config_dict.placeholder(float)
  c.mean = ml_collections.config_dict.placeholder(tuple)
  c.std = ml_collections.config_dict.placeholder(tuple)
  c.augment = "deit"
  c.scale = (0.08, 1.0)
  c.ratio = (3 / 4, 4 / 3)
  c.hflip = 0.5
  c.rand_augment = "rand-m9-mstd0.5-inc1"
  c.color_jitter = 0.3
  c.reprob = 0.25
  c.remode = "pixel"
  c.simple_random_crop = False
  c.repeated_aug = 3
  c.repeated_aug_scope = "global"  # copies of an image on different hosts (DeiT RASampler); 'host': local copies
  c.shuffle_buffer = 10_000
  c.cache = False
  c.prefetch = 2
  c.mixup = 0.8
  c.cutmix = 1.0
  c.mixup_switch_prob = 0.5
  c.mixup_prob = 1.0
  c.mixup_per_device = True
  c.label_smoothing = 0.1
  c.bce_targets = False
  return c


def _resolve(data_cfg, model_defaults=None) -> ml_collections.ConfigDict:
  """Merges defaults <- model defaults <- user config, and validates the values."""
  cfg = default_data_config()
  unknown = set(data_cfg.keys()) - set(cfg.keys())
  if unknown:
    raise ConfigError(f"Unknown data config key(s) {sorted(unknown)}; valid keys: {sorted(cfg.keys())}.")
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # plain copy so None can be overwritten by any type
  for k, v in data_cfg.items():
    cfg[k] = v
  md = dict(FALLBACK_MODEL_DEFAULTS, **(model_defaults or {}))
  for k in ("mean", "std", "crop_pct", "interpolation"):
    if cfg[k] is None:
      cfg[k] = md[k]
  cfg.mean, cfg.std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
  if len(cfg.mean) != 3 or len(cfg.std) != 3:
    raise ConfigError(f"data.mean and data.std need 3 values (RGB); got {cfg.mean} and {cfg.std}.")
  if cfg.augment not in AUGMENTS:
    raise ConfigError(f"data.augment={cfg.augment!r}: use one of {AUGMENTS}.")
  if cfg.interpolation not in INTERPOLATIONS:
    raise ConfigError(f"data.interpolation={cfg.interpolation!r}: use one of {INTERPOLATIONS}.")
  if not 0 < cfg.crop_pct <= 1:
    raise ConfigError(f"data.crop_pct={cfg.crop_pct} must be in (0, 1].")
  if int(cfg.repeated_aug) < 1:
    raise ConfigError(f"data.repeated_aug={cfg.repeated_aug} must be >= 1 (1 = off).")
  if cfg.file_format is not None and cfg.file_format not in sources.FILE_FORMATS:
    raise ConfigError(f"data.file_format={cfg.file_format!r}: use one of {sources.FILE_FORMATS} (or None).")
  if cfg.repeated_aug_scope not in REPEAT_SCOPES:
    raise ConfigError(f"data.repeated_aug_scope={cfg.repeated_aug_scope!r}: use one of {REPEAT_SCOPES}.")
  if cfg.rand_augment:
    try:
      randaugment.parse_config(cfg.rand_augment)  # fail early on a bad string
    except ValueError as e:
      raise ConfigError(f"data.rand_augment: {e}") from None
  return cfg


def _process(process_index, process_count):
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} must be in [0, process_count={pc}).")
  return pi, pc


def _read(builder, split, cfg):
  """Encoded (image bytes, label) pairs of one split, in a fixed order; decoding is left to the pipeline."""
  sources.check_readable(builder)
  if sources.random_access(builder) and "tfrecord" not in sources.file_formats(builder):
    # array_record only: as_dataset cannot read it, so read every index in order.
    reader = sources.RecordReader(builder, split, cfg.image_key)
    n = len(reader)
    chunks = tf.data.Dataset.range(0, n, READ_CHUNK).map(lambda a: tf.range(a, tf.minimum(a + READ_CHUNK, n)))
    ds = _read_indices(chunks, reader, cfg)
  else:
    read_config = tfds.ReadConfig(try_autocache=False, shuffle_seed=None)
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                            decoders={cfg.image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex[cfg.image_key], tf.cast(ex[cfg.label_key], tf.int32)))
  return ds.cache() if cfg.cache else ds


def _read_indices(chunks, reader, cfg):
  """Dataset of index chunks [k], or of (indices [k], *other [k]) -> (*other, encoded image, label) per record,
  read by random access in the chunks' order."""

  def read(indices, *rest):
    serialized = tf.numpy_function(reader.read, [indices], tf.string, stateful=False)
    serialized.set_shape(indices.shape)
    return (*rest, serialized)

  def parse(*args):
    ex = reader.parse(args[-1])
    return (*args[:-1], ex[cfg.image_key], tf.cast(ex[cfg.label_key], tf.int32))
  ds = chunks.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.unbatch().map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _options():
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = True
  return opts


SHARED_STREAM = 0xFFFFFFFF  # "host" index of the stream every host shares (the RASampler permutation)


def _host_seed(seed: int, process_index: int) -> int:
  # A different stream per host, so hosts do not augment with identical random numbers.
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, process_index]).generate_state(1)[0])


def _train_transform(cfg, image_size: int):
  """(encoded, label, seed) -> (normalized float image, label)."""
  # timm's create_transform: fill = the mean on the uint8 scale; resampling = the train interpolation, or
  # bilinear/bicubic drawn per op when it is 'random'.
  ra = randaugment.RandAugment(cfg.rand_augment, fill=tuple(min(255, round(255 * m)) for m in cfg.mean),
                               interpolation=randaugment.timm_interpolation(cfg.interpolation)) \
      if (cfg.augment == "deit" and cfg.rand_augment) else None

  def fn(encoded, label, seed):
    s_crop, s_flip, s_ra, s_cj, s_3a, s_erase = T.split_seed(seed, 6)
    if cfg.augment == "none":
      img = T.eval_resize_crop(encoded, image_size, cfg.crop_pct, cfg.interpolation)
    elif cfg.augment == "3aug" and cfg.simple_random_crop:
      img = T.simple_random_crop(encoded, s_crop, image_size, interpolation=cfg.interpolation)
    else:
      img = T.random_resized_crop(encoded, s_crop, image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                  interpolation=cfg.interpolation)
    if cfg.augment != "none" and cfg.hflip > 0:
      img = T.hflip(img, s_flip, cfg.hflip)
    if cfg.augment == "deit":
      if ra is not None:
        img = ra(img, s_ra)
      elif cfg.color_jitter:
        img = T.color_jitter(img, s_cj, cfg.color_jitter, cfg.color_jitter, cfg.color_jitter)
    elif cfg.augment == "3aug":
      img = T.three_augment(img, s_3a)
      if cfg.color_jitter:
        img = T.color_jitter(img, s_cj, cfg.color_jitter, cfg.color_jitter, cfg.color_jitter)
    img = T.normalize(img, cfg.mean, cfg.std)
    if cfg.augment == "deit" and cfg.reprob > 0:
      img = T.random_erasing(img, s_erase, cfg.reprob, cfg.remode)
    img = tf.ensure_shape(img, [image_size, image_size, 3])
    return img, label
  return fn


def global_repeats(repeated_aug: int, process_count: int, scope: str = "global") -> bool:
  """Whether repeated augmentation spreads the copies of an image over hosts (RASampler) for this run."""
  return int(repeated_aug) > 1 and int(process_count) > 1 and scope == "global"


def epoch_length(num_examples: int, repeated_aug: int, *, process_count: int = 1, scope: str = "host") -> int:
  """Elements per host per epoch.

  Per host (``scope='host'``, a single process, or r = 1): r * ceil(n / r) (= n without repeated augmentation),
  n = the examples of this host's part. Across hosts (:func:`global_repeats`): DeiT's RASampler,
  floor(n // 256 * 256 / P), n = the examples of the whole split (splits under 256 images: floor(n / P)).
  """
  r = int(repeated_aug)
  if global_repeats(r, process_count, scope):
    n = num_examples // RASAMPLER_MULTIPLE * RASAMPLER_MULTIPLE if num_examples >= RASAMPLER_MULTIPLE \
        else num_examples
    return n // int(process_count)
  return r * math.ceil(num_examples / r)


def _epoch_stream(base, n: int, cfg, host_seed: int):
  """Dataset of epochs -> (position, encoded, label), epoch e a pure function of (host_seed, e)."""
  r = int(cfg.repeated_aug)
  keep = math.ceil(n / r)
  length = epoch_length(n, r)
  buffer = max(1, min(int(cfg.shuffle_buffer), n))

  def one_epoch(epoch):
    epoch_seed = tf.stack([tf.constant(host_seed, tf.int64), epoch])
    ds = base
    if r > 1:
      # RASampler: a random subset of ceil(n / r) examples, each repeated r times (same epoch length).
      rank = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), epoch_seed)
      ds = ds.enumerate().filter(lambda i, ex: rank[i] < keep).map(lambda i, ex: ex)
    # Seeds of tf.data shuffle are int64 scalars: fold (host_seed, epoch) into one.
    shuffle_seed = tf.random.experimental.stateless_split(epoch_seed, 1)[0, 0]
    ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    if r > 1:
      ds = ds.flat_map(lambda img, lab: tf.data.Dataset.from_tensors((img, lab)).repeat(r))
    ds = ds.take(length)
    return ds.enumerate().map(lambda pos, ex: (epoch * length + pos, ex[0], ex[1]))
  return one_epoch, length


def rasampler_counts(ranks, repeated_aug: int, process_count: int, process_index: int, length: int):
  """Copies of each image that host `process_index` owns in a RASampler epoch (int64, like `ranks`).

  `ranks` [n] is each image's place in the epoch's permutation: image k (by rank) fills stream positions
  k r .. k r + r - 1; the host owns the positions p = process_index (mod P) below P * length. The count is
  the number of such p in [k r, min(k r + r, P * length)), by floor division.
  """
  r, pc, pi = int(repeated_aug), int(process_count), int(process_index)

  def owned_below(x):  # #{p < x : p = pi (mod P)}, minus 1 (which cancels in the difference)
    return tf.math.floordiv(x - 1 - pi, pc)
  lo = ranks * r
  hi = tf.minimum(lo + r, pc * length)
  return tf.where(hi > lo, owned_below(hi) - owned_below(lo), tf.zeros_like(lo))


def _global_epoch_stream(base, n: int, cfg, host_seed: int, shared_seed: int, process_index: int,
                         process_count: int):
  """Like _epoch_stream, with the RASampler assignment across hosts (module docstring); `base` is the split."""
  r = int(cfg.repeated_aug)
  length = epoch_length(n, r, process_count=process_count, scope="global")
  buffer = max(1, min(int(cfg.shuffle_buffer), n))

  def one_epoch(epoch):
    # The same permutation on every host: seeded without the host.
    ranks = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), tf.stack([tf.constant(shared_seed, tf.int64), epoch]))
    counts = rasampler_counts(ranks, r, process_count, process_index, length)
    ds = base.enumerate().map(lambda i, ex: (counts[i], ex[0], ex[1])).filter(lambda c, img, lab: c > 0)
    epoch_seed = tf.stack([tf.constant(host_seed, tf.int64), epoch])
    shuffle_seed = tf.random.experimental.stateless_split(epoch_seed, 1)[0, 0]
    ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.flat_map(lambda c, img, lab: tf.data.Dataset.from_tensors((img, lab)).repeat(c))
    ds = ds.take(length)
    return ds.enumerate().map(lambda pos, ex: (epoch * length + pos, ex[0], ex[1]))
  return one_epoch, length


def _epoch_orders(n: int, cfg, host_seed: int, shared=None):
  """epoch (int64 scalar tensor) -> dataset of one element, the epoch's [length] example indices in stream order.

  The streams above on indices instead of records (what they do never depends on a record): the same
  stateless permutation and copy counts, the same seeded shuffle buffer (its order depends on the element count
  and seed only), each kept index repeated its count. `shared` = (shared_seed, process_index, process_count)
  selects _global_epoch_stream's RASampler assignment (indices into the whole split), None _epoch_stream's
  (indices into the host's part).
  """
  r = int(cfg.repeated_aug)
  buffer = max(1, min(int(cfg.shuffle_buffer), n))
  if shared is None:
    length = epoch_length(n, r)
  else:
    shared_seed, pi, pc = shared
    length = epoch_length(n, r, process_count=pc, scope="global")

  def orders(epoch):
    epoch_seed = tf.stack([tf.constant(host_seed, tf.int64), epoch])
    idx = tf.range(n, dtype=tf.int64)
    if shared is None:
      copies = tf.fill([n], tf.constant(r, tf.int64))
      if r > 1:
        rank = tf.random.experimental.stateless_shuffle(idx, epoch_seed)
        copies = tf.where(rank < math.ceil(n / r), copies, tf.zeros_like(copies))
    else:
      ranks = tf.random.experimental.stateless_shuffle(idx, tf.stack([tf.constant(shared_seed, tf.int64), epoch]))
      copies = rasampler_counts(ranks, r, pc, pi, length)
    kept = tf.boolean_mask(idx, copies > 0)
    shuffle_seed = tf.random.experimental.stateless_split(epoch_seed, 1)[0, 0]
    ds = tf.data.Dataset.from_tensor_slices(kept).shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return ds.batch(n).map(lambda order: tf.repeat(order, tf.gather(copies, order))[:length])
  return orders, length


def _index_chunks(orders, length: int, first_epoch: int, offset: int):
  """Dataset of (indices [<=READ_CHUNK], stream positions [same]) from position first_epoch * length + offset on."""

  def epoch_chunks(epoch):
    start = tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), tf.constant(0, tf.int64))

    def chunks(order):
      def chunk(a):
        b = tf.minimum(a + READ_CHUNK, length)
        return order[a:b], epoch * length + tf.range(a, b)
      return tf.data.Dataset.range(start, length, READ_CHUNK).map(chunk)
    return orders(epoch).flat_map(chunks)
  return tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_chunks)


def _setup(data_cfg, model_defaults, global_batch_size, process_index, process_count):
  """Resolved config, this process's index and count, the per-process batch and the tfds builder."""
  cfg = _resolve(data_cfg, model_defaults)
  pi, pc = _process(process_index, process_count)
  if global_batch_size % pc:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={pc}.")
  return cfg, pi, pc, global_batch_size // pc, sources.get_builder(cfg)


def build_train_iterator(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                         process_index=None, process_count=None, model_defaults=None) -> Iterator[dict]:
  """Infinite iterator of {'image': float32 [B, H, W, 3], 'label': int32 [B]}, B = global_batch // processes.

  Batch k of ``build_train_iterator(..., start_step=s)`` equals batch s + k of the same call with start_step=0.
  """
  cfg, pi, pc, local_batch, builder = _setup(data_cfg, model_defaults, global_batch_size, process_index,
                                             process_count)
  split = sources.resolve_split(builder, cfg.train_split, purpose="train")
  host_seed = _host_seed(seed, pi)
  sources.check_readable(builder)
  indexed = sources.random_access(builder)
  if global_repeats(cfg.repeated_aug, pc, cfg.repeated_aug_scope):
    read_split = split
    n = builder.info.splits[split].num_examples
    if epoch_length(n, cfg.repeated_aug, process_count=pc, scope="global") == 0:
      raise sources.DataSourceError(f"Split {split!r} has {n} examples: fewer than the {pc} processes.")
    shared = (_host_seed(seed, SHARED_STREAM), pi, pc)
  else:
    read_split = tfds.even_splits(split, n=pc)[pi]
    n = builder.info.splits[read_split].num_examples
    if n == 0:
      raise sources.DataSourceError(f"Host {pi} of {pc} gets no training examples from split {split!r}.")
    shared = None
  if indexed:
    orders, length = _epoch_orders(n, cfg, host_seed, shared)
  elif shared is None:
    one_epoch, length = _epoch_stream(_read(builder, read_split, cfg).take(n), n, cfg, host_seed)
  else:
    one_epoch, length = _global_epoch_stream(_read(builder, read_split, cfg).take(n), n, cfg, host_seed, *shared)
  start = int(start_step) * local_batch
  first_epoch, offset = divmod(start, length)

  if indexed:
    # Random access: compute the epoch's order on indices, read only the records from the position on.
    log.info("train data %s %r: random access (array_record), starting at position %d of epoch %d "
             "(no earlier record read)", builder.name, split, offset, first_epoch)
    reader = sources.RecordReader(builder, read_split, cfg.image_key)
    ds = _read_indices(_index_chunks(orders, length, first_epoch, offset), reader, cfg)
  else:
    if offset:
      log.warning("train data %s %r is stored as tfrecord (read in file order): resuming reads through %d "
                  "records of epoch %d before its first batch; a dataset prepared as array_record starts there "
                  "directly (docs/training.md)", builder.name, split, offset, first_epoch)
    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
    ds = ds.skip(offset)  # before decoding: skipping costs reads, not decodes
  transform = _train_transform(cfg, int(cfg.image_size))

  def with_seed(pos, encoded, label):
    return transform(encoded, label, tf.stack([tf.constant(host_seed, tf.int64), pos]))
  ds = ds.map(with_seed, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(int(cfg.prefetch))
  ds = ds.with_options(_options())
  return ({"image": img, "label": lab} for img, lab in ds.as_numpy_iterator())


def _eval_split(builder, cfg):
  return sources.resolve_split(builder, cfg.eval_split, purpose="eval")


def num_eval_examples(data_cfg) -> int:
  cfg = _resolve(data_cfg)
  builder = sources.get_builder(cfg)
  return builder.info.splits[_eval_split(builder, cfg)].num_examples


def eval_label_classes(data_cfg) -> tuple[int | None, bool]:
  """(class count of the eval labels or None when unknown, whether each label is a set of classes)."""
  cfg = _resolve(data_cfg)
  builder = sources.get_builder(cfg)
  _eval_split(builder, cfg)
  n = label_set_classes(builder, cfg)
  if n:
    return n, True
  n = cfg.num_classes or getattr(builder.info.features[cfg.label_key], "num_classes", None)
  return (int(n) if n else None), False


def dataset_info(data_cfg):
  """(num_classes, num_train_examples) of the configured train split (all hosts together)."""
  cfg = _resolve(data_cfg)
  builder = sources.get_builder(cfg)
  split = sources.resolve_split(builder, cfg.train_split, purpose="train")
  n = builder.info.splits[split].num_examples
  feature = builder.info.features[cfg.label_key]
  ds_classes = getattr(feature, "num_classes", None)
  if cfg.num_classes is not None:
    if ds_classes is not None and cfg.num_classes < ds_classes:
      raise ValueError(f"data.num_classes={cfg.num_classes} is smaller than the {ds_classes} classes of "
                       f"{builder.name!r}; labels would fall outside the head.")
    return int(cfg.num_classes), n
  if ds_classes is None:
    raise ValueError(f"Cannot read the number of classes of {builder.name!r}: set data.num_classes.")
  return int(ds_classes), n


def label_set_classes(builder, cfg) -> int:
  """The class count C when the label feature is a set of classes (``Sequence(ClassLabel)``), else 0."""
  feature = builder.info.features[cfg.label_key]
  if not isinstance(feature, tfds.features.Sequence):
    return 0
  n = cfg.num_classes or getattr(feature.feature, "num_classes", None)
  if not n:
    raise sources.DataSourceError(f"the label feature {cfg.label_key!r} of {builder.name!r} is a sequence of "
                                  "labels without a class count: set data.num_classes.")
  return int(n)


def build_eval_iterator(data_cfg, *, global_batch_size: int, process_index=None, process_count=None,
                        model_defaults=None) -> Iterator[dict]:
  """Finite iterator of {'image', 'label', 'mask' (float32, 0 = padding)}; same batch count on every host.

  Each host reads its ``even_splits`` part; the last batches are padded with masked zeros so all hosts run
  ceil(max host size / local batch) batches and each example is counted exactly once. A label feature that
  is a set of classes (a tfds ``Sequence(ClassLabel)``, e.g. ImageNet-ReaL's 'real_label') comes as a
  multi-hot float32 [C] per example (all zeros for an empty set).
  """
  cfg, pi, pc, local_batch, builder = _setup(data_cfg, model_defaults, global_batch_size, process_index,
                                             process_count)
  split = _eval_split(builder, cfg)
  host_splits = tfds.even_splits(split, n=pc)
  sizes = [builder.info.splits[s].num_examples for s in host_splits]
  num_batches = math.ceil(max(sizes) / local_batch)
  size = int(cfg.image_size)
  set_classes = label_set_classes(builder, cfg)

  @tf.autograph.experimental.do_not_convert  # plain TF ops; AutoGraph only warns about the closure
  def transform(encoded, label):
    img = T.normalize(T.eval_resize_crop(encoded, size, cfg.crop_pct, cfg.interpolation), cfg.mean, cfg.std)
    if set_classes:
      label = tf.minimum(tf.reduce_sum(tf.one_hot(label, set_classes, dtype=tf.float32), axis=0), 1.0)
    return {"image": img, "label": label, "mask": tf.constant(1.0, tf.float32)}
  ds = _read(builder, host_splits[pi], cfg).take(sizes[pi])
  ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  pad = num_batches * local_batch - sizes[pi]
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, 3], tf.float32),
      "label": tf.zeros([set_classes], tf.float32) if set_classes else tf.constant(0, tf.int32),
      "mask": tf.constant(0.0, tf.float32)}).repeat(pad)
  ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True).prefetch(int(cfg.prefetch))
  ds = ds.with_options(_options())
  return iter(ds.as_numpy_iterator())


def mixup_kwargs(data_cfg, num_classes: int) -> dict:
  """Keyword arguments for :func:`vit_jax_fix.data.mixup_cutmix` from a data config."""
  cfg = _resolve(data_cfg)
  return dict(num_classes=int(num_classes), mixup_alpha=float(cfg.mixup), cutmix_alpha=float(cfg.cutmix),
              switch_prob=float(cfg.mixup_switch_prob), prob=float(cfg.mixup_prob),
              label_smoothing=float(cfg.label_smoothing), bce_targets=bool(cfg.bce_targets))
