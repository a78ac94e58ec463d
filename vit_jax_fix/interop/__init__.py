"""Weights in and out: PyTorch state_dicts (official and timm layouts) and official constructors."""
from vit_jax_fix.interop.state_dict import (LAYOUTS, StateDictMismatch, from_torch_state_dict,
                                            to_torch_state_dict, torch_keys)
from vit_jax_fix.interop.official import from_official_constructor

__all__ = ["LAYOUTS", "StateDictMismatch", "from_torch_state_dict", "to_torch_state_dict", "torch_keys",
           "from_official_constructor"]
