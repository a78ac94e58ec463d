"""The package's front door: `vit_jax_fix.create_model(name, pretrained=..., **overrides)`.

It sits above the model registry (`models.registry.create_model`, random init) and the weight loader
(`interop.weights.load_pretrained`, which builds its model through the registry), so neither imports the
other's layer:

    model = vit_jax_fix.create_model('deit_small_patch16_224')                    # random init, official config
    model = vit_jax_fix.create_model('deit_small_patch16_224', pretrained=True)   # the authors' weights, cached
    model = vit_jax_fix.create_model('cait_S24_224', pretrained='/data/S24_224.pth')  # a file or https:// URL
"""
from __future__ import annotations

from flax import nnx

from vit_jax_fix import errors
from vit_jax_fix.models import registry


def create_model(name: str, *, pretrained: bool | str = False, rngs: nnx.Rngs | None = None, seed: int = 0,
                 features_only: bool = False, out_indices=None, **overrides) -> nnx.Module:
  """A registered model, randomly initialised (`rngs` or `seed`), or with weights: `pretrained=True` loads the
  authors' released file of `name` (downloaded once into the cache, see `vit_jax_fix.interop.weights`),
  `pretrained='PATH'` or `'https://...'` that PyTorch file. The weights define the classifier: a `num_classes`
  other than the file's is an error (the trainer's `init_from` re-initialises a head of another size); other
  overrides (drop rates, keep_rate, dtype) apply. `features_only=True` returns the backbone of a dense
  head instead: a `models.features.FeatureExtractor` giving the NHWC maps of `out_indices` (blocks, or
  Shunted's stages; see `forward_intermediates`) and their `feature_info`."""
  if features_only:
    from vit_jax_fix.models.features import FeatureExtractor
    return FeatureExtractor(create_model(name, pretrained=pretrained, rngs=rngs, seed=seed, **overrides),
                            out_indices)
  if out_indices is not None:
    raise errors.ConfigError("create_model: out_indices= is an argument of features_only=True")
  if pretrained is False or pretrained is None:
    return registry.create_model(name, rngs=rngs, seed=seed, **overrides)
  if rngs is not None:
    raise ValueError("create_model: rngs= with pretrained=: the weights replace every parameter")
  from vit_jax_fix.interop.weights import load_pretrained
  return load_pretrained(name, pretrained, **overrides)
