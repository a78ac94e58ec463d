"""vit_jax_fix: deep vision transformers that fight feature collapse, in JAX/Flax NNX."""
from vit_jax_fix.models.registry import create_model, list_models, model_defaults

__all__ = ["create_model", "list_models", "model_defaults"]
__version__ = "0.1.0"
