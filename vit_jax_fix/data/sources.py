"""Data sources: every source is a tfds builder, so all datasets share one reading code path.

* ``dataset='<tfds name>'`` (e.g. ``imagenet2012``): a builder already prepared under ``data_dir``. Nothing is
  downloaded at run time: an unprepared dataset raises :class:`DataSourceError` saying where tfds looked and
  what to put there (tfds retries downloads offline for minutes, so we never let it try).
* ``dataset='from_data_dir'``: ``data_dir`` points at a prepared ``<name>/<config>/<version>`` directory.
* ``dataset='folder'``: ``folder`` is an image folder, either ``root/<class>/<img>`` (one split, ``train``) or
  ``root/<split>/<class>/<img>``. It is prepared once into tfrecords (under ``data_dir`` or the cache dir) by
  :class:`ImageFolderBuilder`, which re-encodes odd modes (CMYK, 16-bit, palette, RGBA, BMP/GIF/TIFF/WebP) to
  8-bit RGB/gray and skips unreadable files with a count, so a corrupt JPEG cannot crash a run hours in.
* ``dataset='demo'``: the embedded MNIST-5k (see :mod:`vit_jax_fix.data.demo`), prepared on first use.

Random access. A dataset prepared as ``array_record`` (``tfds build --file_format=array_record``, or
``data.file_format='array_record'`` for the folder and demo sources) is read by index (:class:`RecordReader`):
the train iterator then resumes at any position without reading the records before it. A ``tfrecord`` dataset is
read in file order only (tfds' ``as_dataset``); ``array_record`` files cannot be read that way, so a dataset held
only as ``array_record`` needs the ``array_record`` package (tfds installs it on Linux).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import logging
import os
import re
import warnings

import numpy as np
import tensorflow_datasets as tfds

from vit_jax_fix import errors, paths
from vit_jax_fix.data import demo as demo_lib

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_DIR_NAMES = ("train", "val", "validation", "test")
IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class DataSourceError(errors.UserError, ValueError):
  """A dataset, split or folder that cannot be used, with a message saying how to fix it."""


def default_data_dir() -> str:
  """Where the demo and image-folder datasets are prepared when ``data_dir`` is None."""
  return os.environ.get("VIT_JAX_FIX_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "vit_jax_fix", "tensorflow_datasets"))


# --------------------------------------------------------------------------------------------- image folders


def _subdirs(path: str) -> list[str]:
  """The names of the non-hidden directories in `path`, sorted."""
  return sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))


def _split_roots(root: str) -> dict[str, str]:
  """{split: directory of its class folders}: root/<split>/<class>/<img> when every subdirectory is a split
  name; else root/<class>/<img> as `train`."""
  subdirs = _subdirs(root)
  split_dirs = [d for d in subdirs if d.lower() in SPLIT_DIR_NAMES]
  return {d: os.path.join(root, d) for d in split_dirs} if split_dirs and split_dirs == subdirs else {"train": root}


def empty_class_folders(root: str) -> list[str]:
  """The class folders of image folder `root` that hold no image (at any depth), as paths relative to `root`
  (e.g. 'val/cat'); [] when `root` is not a directory. They still become classes of the head (labels keep
  their order), classes nobody trains on."""
  if not os.path.isdir(root):
    return []
  empty = []
  for split_root in _split_roots(root).values():
    for cls in _subdirs(split_root):
      path = os.path.join(split_root, cls)
      if not any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, fs in os.walk(path) for f in fs):
        empty.append(os.path.relpath(path, root))
  return empty


def _list_folder(root: str):
  """Returns ({split: [(relpath, class_name)]}, class_names); raises DataSourceError for unusable folders."""
  if not os.path.isdir(root):
    raise DataSourceError(f"Image folder {root!r} does not exist or is not a directory. "
                          "Set data.folder to a directory laid out as root/<class>/<image>.")
  files, classes = {}, set()
  for split, split_root in _split_roots(root).items():
    entries = []
    for cls in _subdirs(split_root):
      for dirpath, dirnames, filenames in os.walk(os.path.join(split_root, cls)):
        dirnames.sort()
        for f in sorted(filenames):
          if f.lower().endswith(IMAGE_EXTENSIONS):
            entries.append((os.path.relpath(os.path.join(dirpath, f), root), cls))
      classes.add(cls)
    files[split] = entries
  n = sum(len(v) for v in files.values())
  if not classes or n == 0:
    raise DataSourceError(
        f"Image folder {root!r} holds no images: expected root/<class_name>/<image> (or "
        f"root/<split>/<class_name>/<image>) with extensions {', '.join(IMAGE_EXTENSIONS)}; "
        f"found {len(classes)} class directories and {n} image files.")
  for split, entries in files.items():
    if not entries:
      raise DataSourceError(f"Split directory {os.path.join(root, split)!r} holds no images.")
  return files, sorted(classes)


def _folder_fingerprint(root: str, files) -> str:
  h = hashlib.sha1(os.path.abspath(root).encode())
  for split in sorted(files):
    for rel, cls in files[split]:
      st = os.stat(os.path.join(root, rel))
      h.update(f"{split}|{rel}|{cls}|{st.st_size}|{int(st.st_mtime)}\n".encode())
  return h.hexdigest()[:12]


def _normalize_image_bytes(path: str):
  """Returns encoded JPEG/PNG bytes that tf.io.decode_image reads as 8-bit RGB or gray, or None if unreadable.

  JPEG and PNG files that are already 8-bit RGB or gray are kept byte for byte; anything else (CMYK, 16-bit,
  palette, alpha, other formats) is converted with PIL and stored as lossless PNG.
  """
  from PIL import Image
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # full decode: catches truncated files now, not in the middle of training
      if img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L"):
        return data
      if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit gray: scale to 8 bits (PIL's convert('L') would clip instead of scaling).
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
      elif img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # CMYK, P, RGBA, LA, YCbCr, ... (alpha is dropped)
      out = io.BytesIO()
      img.save(out, format="PNG")
      return out.getvalue()
  except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this file"
    log.warning("Skipping unreadable image %s: %s", path, e)
    return None


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  root: str = ""


class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder):
  """An image folder prepared into tfrecords (one builder config per folder content fingerprint)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Image folder re-encoded to 8-bit RGB/gray; unreadable files skipped."}

  def __init__(self, *, root: str, data_dir: str | None = None, file_format: str = "tfrecord"):
    self._files, self._classes = _list_folder(root)
    name = re.sub(r"[^a-z0-9_]", "_", os.path.basename(os.path.abspath(root)).lower())[:40] or "root"
    # array_record gets its own config name: a folder prepared in both formats keeps both.
    suffix = "_ar" if file_format == "array_record" else ""
    config = ImageFolderConfig(name=f"{name}_{_folder_fingerprint(root, self._files)}{suffix}", root=root,
                               version=self.VERSION)
    super().__init__(config=config, data_dir=data_dir or default_data_dir(), file_format=file_format)
    self.num_skipped = {}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Image folder {self.builder_config.root}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, None)),
            "label": tfds.features.ClassLabel(names=self._classes),
            "path": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, entries) for split, entries in self._files.items()}

  def _generate_examples(self, split, entries):
    root = self.builder_config.root
    skipped = []
    # PIL releases the GIL while decoding, so threads check files in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
      paths = [os.path.join(root, rel) for rel, _ in entries]
      for (rel, cls), data in zip(entries, pool.map(_normalize_image_bytes, paths)):
        if data is None:
          skipped.append(rel)
          continue
        yield rel, {"image": data, "label": cls, "path": rel}
    self.num_skipped[split] = len(skipped)
    if skipped:
      msg = (f"Image folder {root!r}, split {split!r}: skipped {len(skipped)} unreadable file(s) of "
             f"{len(entries)}, e.g. {skipped[:5]}")
      log.warning(msg)
      warnings.warn(msg, stacklevel=2)
    if len(skipped) == len(entries):
      raise DataSourceError(f"Image folder {root!r}, split {split!r}: none of the {len(entries)} files could "
                            "be decoded as an image.")


# ------------------------------------------------------------------------------------------------- builders


FILE_FORMATS = ("tfrecord", "array_record")


def has_array_record() -> bool:
  """Whether the ``array_record`` package (random-access reading) is importable."""
  try:
    from array_record.python import array_record_data_source  # noqa: F401
  except ImportError:
    return False
  return True


def prepare_file_format(file_format: str | None) -> str:
  """The file format to prepare the folder/demo sources in: `file_format` (None: 'tfrecord'), with
  'array_record' falling back to 'tfrecord' (and a warning) when the array_record package is missing."""
  fmt = file_format or "tfrecord"
  if fmt not in FILE_FORMATS:
    raise errors.ConfigError(f"data.file_format={file_format!r}: use one of {FILE_FORMATS}.")
  if fmt == "array_record" and not has_array_record():
    log.warning("data.file_format='array_record' but the array_record package is not installed "
                "(pip install array_record): preparing as tfrecord, read in file order.")
    return "tfrecord"
  return fmt


def file_formats(builder) -> set[str]:
  """The file formats `builder`'s data is stored in ('tfrecord', 'array_record', ...)."""
  formats = {f.value for f in builder.info.available_file_formats()}
  if builder.info.file_format is not None:
    formats.add(builder.info.file_format.value)
  return formats


def random_access(builder) -> bool:
  """Whether `builder`'s records can be read by index: prepared as array_record and the package importable."""
  return "array_record" in file_formats(builder) and has_array_record()


def check_readable(builder) -> None:
  """Raises DataSourceError when the records can be read neither in file order nor by index."""
  if file_formats(builder) == {"array_record"} and not has_array_record():
    raise DataSourceError(
        f"Dataset {builder.name!r} in {builder.data_dir!r} is stored as array_record only, which needs the "
        "array_record package to be read: pip install array_record (or prepare it as tfrecord).")


class RecordReader:
  """The serialized examples of a split by index (array_record), parsed as tfds' `as_dataset` parses them.

  ``read(indices)`` returns the serialized records (int64 indices into the split, slices and ``even_splits``
  parts allowed); ``parse(serialized)`` is the graph function giving the feature dict with the image left
  encoded. Index i is the i-th example of the split in file order, the order `as_dataset(shuffle_files=False)`
  reads, so both readers see the same sequence.
  """

  def __init__(self, builder, split: str, image_key: str):
    from tensorflow_datasets.core import example_parser
    self.split = split
    self._source = builder.as_data_source(split=split, file_format="array_record").data_source
    self._features = builder.info.features
    self._parser = example_parser.ExampleParser(self._features.get_serialized_info())
    self._decoders = {image_key: tfds.decode.SkipDecoding()}

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices) -> np.ndarray:
    keys = [int(i) for i in np.asarray(indices).reshape(-1)]
    return np.array(self._source.__getitems__(keys) if keys else [], dtype=object)

  def parse(self, serialized):
    return self._features.decode_example(self._parser.parse_example(serialized), decoders=self._decoders)


def _prepare_locally(builder):
  """Prepares a builder whose data comes from local files only (demo, folder); never downloads."""
  if not builder.is_prepared():
    log.info("Preparing %s under %s (one-time)", builder.name, builder.data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def _not_prepared_error(name: str, builder) -> DataSourceError:
  # The data-dir root (builder.data_dir is <root>/<name>[/<config>]/<version>).
  data_dir = str(getattr(builder, "_data_dir_root", None) or os.path.dirname(os.path.dirname(builder.data_dir)))
  if name.split("/")[0].split(":")[0] == "imagenet2012":
    manual = os.path.join(data_dir, "downloads", "manual")
    return DataSourceError(
        f"ImageNet (imagenet2012) is not prepared: tfds looked in {builder.data_dir!r}. ImageNet needs a "
        f"manual download: put {' and '.join(IMAGENET_MANUAL_FILES)} in {manual!r}, then run once "
        f"`tfds build imagenet2012 --data_dir={data_dir}` (or set data.data_dir to the directory that already "
        "holds the prepared imagenet2012/). The input pipeline never downloads at run time.")
  return DataSourceError(
      f"tfds dataset {name!r} is not prepared: tfds looked in {builder.data_dir!r}. The input pipeline never "
      f"downloads at run time; prepare it once with `tfds build {name} --data_dir={data_dir}` on a machine "
      "with network access, or set data.data_dir to where it is prepared.")


def get_builder(cfg):
  """Returns a prepared tfds builder for ``cfg.dataset`` (see the module docstring)."""
  name = cfg.dataset
  if not name:
    raise DataSourceError("data.dataset is empty: use a tfds name (e.g. 'imagenet2012'), 'demo', 'folder' or "
                          "'from_data_dir'.")
  if name == "demo":
    fmt = prepare_file_format(cfg.get("file_format"))
    data_dir = cfg.data_dir or default_data_dir()
    if fmt == "array_record":  # beside the tfrecord copy, not over it (one prepared dir per format)
      data_dir = os.path.join(data_dir, "array_record")
    return _prepare_locally(demo_lib.DemoMnist5k(data_dir=data_dir, file_format=fmt))
  if name == "folder":
    if not cfg.get("folder"):
      raise DataSourceError("data.dataset='folder' needs data.folder, the image-folder root (root/<class>/<img>).")
    return _prepare_locally(ImageFolderBuilder(root=cfg.folder, data_dir=cfg.data_dir,
                                               file_format=prepare_file_format(cfg.get("file_format"))))
  if name == "from_data_dir":
    if not cfg.data_dir or not (paths.as_path(cfg.data_dir) / "dataset_info.json").is_file():   # gs:// too
      raise DataSourceError(
          f"data.dataset='from_data_dir' needs data.data_dir to be a prepared dataset directory "
          f"(<name>/<config>/<version>/ holding dataset_info.json); got {cfg.data_dir!r}.")
    return tfds.builder_from_directory(cfg.data_dir)
  try:
    builder = tfds.builder(name, data_dir=cfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataSourceError(
        f"Unknown dataset {name!r}: it is neither a tfds dataset nor one of 'demo', 'folder', "
        f"'from_data_dir'. ({str(e).splitlines()[0]})") from None
  if not builder.is_prepared():
    raise _not_prepared_error(name, builder)
  return builder


def resolve_split(builder, split: str | None, *, purpose: str) -> str:
  """Checks a split string (e.g. 'train[:99%]'); None picks the eval split ('validation', else 'test')."""
  available = list(builder.info.splits.keys())
  if split is None:
    for cand in (("validation", "test", "val") if purpose == "eval" else ("train",)):
      if cand in available:
        return cand
    raise DataSourceError(f"Dataset {builder.name!r} has no default {purpose} split; available splits: "
                          f"{available}. Set data.{purpose}_split, e.g. 'train[90%:]'.")
  try:
    n = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    raise DataSourceError(
        f"Unknown or malformed {purpose} split {split!r} for dataset {builder.name!r}: available splits are "
        f"{available} (slices like 'train[:99%]' or 'train[1000:]' are allowed). ({e})") from None
  if n == 0:
    raise DataSourceError(f"Split {split!r} of dataset {builder.name!r} is empty.")
  return split
