"""vit_jax_fix: deep vision transformers that fight feature collapse, in JAX/Flax NNX."""
__all__ = ["create_model", "list_models", "model_defaults"]
__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so that `import vit_jax_fix.hostmem` (main.py's first step) does not load JAX.
  if name == "create_model":
    from vit_jax_fix import api   # create_model with pretrained= (above the registry and the weight loader)
    return api.create_model
  if name in __all__:
    from vit_jax_fix.models import registry
    return getattr(registry, name)
  raise AttributeError(f"module 'vit_jax_fix' has no attribute {name!r}")
