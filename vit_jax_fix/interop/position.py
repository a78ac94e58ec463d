"""Position-embedding resizing with PyTorch's interpolation arithmetic, for weight loading.

The maths lives in `vit_jax_fix.models.position` (one implementation: models resize `pos_embed` in the graph
with it under `dynamic_img_size=True`, and interop must not be imported by models); these are its names.
"""
from vit_jax_fix.models.position import interp_matrix, resize_grid, resize_pos_embed  # noqa: F401

__all__ = ["interp_matrix", "resize_grid", "resize_pos_embed"]
