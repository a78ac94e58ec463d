"""Input pipeline: tfds / image-folder / embedded demo sources, DeiT and DeiT III augmentations (tf.data, on
host), and Mixup/CutMix (JAX, on device). See :mod:`vit_jax_fix.data.pipeline` for every config key."""
try:
  import tensorflow  # noqa: F401  (the input pipeline's only engine; not a dependency of the package)
except ImportError as e:
  from vit_jax_fix import errors
  raise errors.MissingDependencyError(
      "the input pipeline needs TensorFlow, which vit_jax_fix leaves to the environment (Colab and most "
      "clusters have it): pip install 'vit_jax_fix[cpu]' (or tensorflow-cpu) on a machine without it.") from e

from vit_jax_fix.data.mixup import mixup_cutmix
from vit_jax_fix.data.pipeline import build_eval_iterator
from vit_jax_fix.data.pipeline import build_train_iterator
from vit_jax_fix.data.pipeline import dataset_info
from vit_jax_fix.data.pipeline import default_data_config
from vit_jax_fix.data.pipeline import epoch_length
from vit_jax_fix.data.pipeline import mixup_kwargs
from vit_jax_fix.data.pipeline import num_eval_examples
from vit_jax_fix.data.sources import DataSourceError
from vit_jax_fix.data.sources import empty_class_folders

__all__ = [
    "DataSourceError", "build_eval_iterator", "build_train_iterator", "dataset_info", "default_data_config",
    "empty_class_folders", "epoch_length", "mixup_cutmix", "mixup_kwargs", "num_eval_examples",
]
