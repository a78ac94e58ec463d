"""The trainer: config validation, optimizers, sharding, checkpoints, evaluation and the loop."""
from vit_jax_fix.train.checkpoint import load_model
from vit_jax_fix.train.config import base_config, validate
from vit_jax_fix.train.loop import NonFiniteLossError, Setup, train_and_evaluate

__all__ = ["NonFiniteLossError", "Setup", "base_config", "load_model", "train_and_evaluate", "validate"]
