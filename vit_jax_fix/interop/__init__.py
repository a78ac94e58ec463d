"""Weights in and out: PyTorch state_dicts (official and timm layouts), weight files, Google npz.

In-memory: `to_torch_state_dict(model, layout='official'|'timm')`, `from_torch_state_dict(model, sd, layout=)`.
Files: `save_torch(model, 'm.safetensors'|'m.pth', name=, overrides=)` / `load_torch(path, name=None)`
(checkpoint_io), `load_npz(path, name, overrides)` (npz), `timm_config(name, **overrides)` (timm_models),
`resize_pos_embed` (position). CLI: `python -m vit_jax_fix.convert to-torch|from-torch`. A library: nothing here
reads or writes the trainer's checkpoints (`vit_jax_fix.train.checkpoint.save_model` writes a model loaded here
as one).
"""
from vit_jax_fix.interop.state_dict import (LAYOUTS, StateDictMismatch, from_torch_state_dict,
                                            to_torch_state_dict, torch_keys)
from vit_jax_fix.interop.official import from_official_constructor
from vit_jax_fix.interop.checkpoint_io import (UnsafeCheckpoint, load_torch, read_state_dict, save_torch,
                                               write_state_dict)
from vit_jax_fix.interop.npz import load_npz, to_npz_dict
from vit_jax_fix.interop.position import resize_pos_embed
from vit_jax_fix.interop.timm_models import TimmUnsupported, default_layout, timm_config

__all__ = ["LAYOUTS", "StateDictMismatch", "from_torch_state_dict", "to_torch_state_dict", "torch_keys",
           "from_official_constructor", "UnsafeCheckpoint", "load_torch", "read_state_dict", "save_torch",
           "write_state_dict", "load_npz", "to_npz_dict", "resize_pos_embed",
           "TimmUnsupported", "default_layout", "timm_config"]
