"""The one ViT backbone: a pre-norm Block that composes every fix, and the VisionTransformer around it.

Every family of the zoo is this backbone with options (see `registry.py` for the official names). The options,
one row each in `options.py` (default, how the blocks take it, what timm makes of it, README text): LayerScale,
CaiT talking heads and class attention, AttnScale, FeatScale, DeepViT re-attention and scale adjustment, AugViT
augmented shortcuts, EViT token reorganisation, the position-embedding and stem variants. Block-level options
accept one value for all blocks or one per block; boolean fixes also accept 'last:K' / 'first:K' or a list of
block indices, e.g. `reattention='last:4'`. Where the blocks keep their parameters (`param_layout`) is
`layout.py`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.models import features, layers, layout, options, position, shortcuts, spectral, token_reorg
from vit_jax_fix.models.attention import Attention, ClassAttention
# The parameter layout lives in models/layout.py, the option table in models/options.py; these names stay
# importable from here.
from vit_jax_fix.models.layout import (LAYOUTS as PARAM_LAYOUTS, stack_block_tree,  # noqa: F401
                                       unstack_block_tree, with_param_layout)
from vit_jax_fix.models.options import select_blocks  # noqa: F401

FEAT_SCALE_MODES = (None, "double", "single")


class Block(nnx.Module):
  """Pre-norm transformer block; every fix is an option (one row each in `options.py`)."""

  @property
  def torch_child_names(self):
    # Official keys: FeatScale's lamb1/lamb2 sit on the block; two-path AugViT projections sit in
    # nn.Sequential(proj, GELU), hence the '.0'.
    names = {"feat_scale": ""}
    if shortcuts.two_paths(self.aug_shortcut):
      names.update({n: f"{n}.0" for n in ("augs_attn", "augs", "augs_attn2", "augs2")})
    return names

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, mlp_ratio: float = 4.0,
               qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0,
               attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
               layer_scale: float | None = None, talking_heads: bool = False, attn_scale: bool = False,
               reattention: bool = False, reattention_scale: bool = False, feat_scale: str | None = None,
               feat_scale_bands: int = 2, feat_scale_impl: str = "auto", aug_shortcut: str | None = None,
               num_cir: int = 4, circulant_impl: str = "auto", aug_paper_form: bool = False,
               scale_adjustment: float = 1.0, keep_rate: float = 1.0, fuse_token: bool = False,
               drop_path_active: bool | None = None, dtype=None, precision=None):
    if feat_scale not in FEAT_SCALE_MODES:
      raise ValueError(f"feat_scale must be one of {FEAT_SCALE_MODES}, got {feat_scale!r}")
    self.scale_adjustment = float(scale_adjustment)
    self.keep_rate = float(keep_rate)
    token_reorg.kept_tokens(10, self.keep_rate)  # validates the range early
    self.fuse_token = bool(fuse_token)
    self.norm1 = layers.layer_norm(dim, norm_eps, rngs=rngs)
    self.attn = Attention(dim, num_heads, rngs=rngs, qkv_bias=qkv_bias, qk_scale=qk_scale,
                          attn_drop=attn_drop, proj_drop=drop, talking_heads=talking_heads,
                          attn_scale=attn_scale, reattention=reattention,
                          reattention_scale=reattention_scale, dtype=dtype, precision=precision)
    self.feat_scale = (spectral.FeatScale(dim, bands=feat_scale_bands, double=feat_scale == "double",
                                          impl=feat_scale_impl) if feat_scale else nnx.data(None))
    if layer_scale is not None:
      self.gamma_1 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
      self.gamma_2 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
    else:
      self.gamma_1 = self.gamma_2 = nnx.data(None)
    self.drop_path = layers.DropPath(drop_path, rngs=rngs, active=drop_path_active)
    self.norm2 = layers.layer_norm(dim, norm_eps, rngs=rngs)
    self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), rngs=rngs, drop=drop, dtype=dtype, precision=precision)
    self.aug_shortcut = shortcuts.check_mode(aug_shortcut)
    self.aug_paper_form = aug_paper_form
    self.aug_rescale = shortcuts.rescale_factor(aug_shortcut, aug_paper_form)
    if aug_shortcut:
      make = lambda: shortcuts.make_aug_projection(aug_shortcut, dim, num_cir=num_cir, impl=circulant_impl,
                                                   rngs=rngs, dtype=dtype, precision=precision)
      # Creation order of the official code: augs_attn, augs (, augs_attn2, augs2).
      self.augs_attn = make()
      self.augs = make()
      if shortcuts.two_paths(aug_shortcut):
        self.augs_attn2 = make()
        self.augs2 = make()

  def _aug_sum(self, x, normed, x_in, names: Sequence[str]):
    """Add the augmented paths to x. Official form: they read the LayerNorm output `normed`, GELU after each
    projection in the two-path modes, then the whole update is rescaled by 3/4. Paper form: they read the
    sub-layer input `x_in`, no rescale."""
    src = x_in if self.aug_paper_form else normed
    two = shortcuts.two_paths(self.aug_shortcut)
    # The paths of a sub-layer read the same input: one shared FFT (or one GEMM) for all of them.
    for path in shortcuts.apply_group([getattr(self, name) for name in names], src):
      x = x + (layers.gelu(path) if two else path).astype(x.dtype)
    return x * self.aug_rescale if self.aug_rescale != 1.0 else x

  def __call__(self, x, *, grid=None, num_prefix: int = 1, return_map: bool = False):
    """x: (B, N, D). Returns (x, aux): aux['attn'] the post-softmax map (B, H, N, N) when asked,
    aux['reorg'] the EViT selection when this block reorganises tokens."""
    a = self.scale_adjustment
    two = shortcuts.two_paths(self.aug_shortcut)
    # --- attention sub-layer
    x_in = x
    u = self.norm1(x * a if a != 1.0 else x)
    # EViT needs only the class token's row of the map: the output keeps the fused kernel.
    y, probs = self.attn(u, return_map=return_map, cls_row=self.keep_rate < 1.0)
    if a != 1.0:
      y = y / a
    if self.feat_scale is not None:
      y = self.feat_scale(y, grid=grid, num_prefix=num_prefix)
    if self.gamma_1 is not None:
      y = self.gamma_1[...] * y
    # The residual stream keeps its dtype (bf16 under dtype=bfloat16): fp32 parameters such as LayerScale or
    # FeatScale gains would promote it, and a scanned block's carry must not change dtype.
    x = x + self.drop_path(y).astype(x.dtype)
    if self.aug_shortcut:
      x = self._aug_sum(x, u, x_in, ("augs_attn", "augs_attn2") if two else ("augs_attn",))
    # --- EViT reorganisation, between the attention and the MLP of the same block
    reorg = None
    if self.keep_rate < 1.0:
      x, reorg = token_reorg.reorganize(x, probs, self.keep_rate, self.fuse_token)
    # --- MLP sub-layer
    x_in = x
    v = self.norm2(x * a if a != 1.0 else x)
    m = self.mlp(v)
    if self.gamma_2 is not None:
      m = self.gamma_2[...] * m
    m = self.drop_path(m)
    x = x + (m / a if a != 1.0 else m).astype(x.dtype)
    if self.aug_shortcut:
      x = self._aug_sum(x, v, x_in, ("augs", "augs2") if two else ("augs",))
    return x, {"attn": probs if return_map else None, "reorg": reorg}


class ClassAttentionBlock(nnx.Module):
  """CaiT `LayerScale_Block_CA`: updates only the class token from [cls, patches]."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, mlp_ratio: float = 4.0,
               qkv_bias: bool = True, qk_scale=None, norm_eps: float = 1e-6, layer_scale: float = 1e-5,
               dtype=None, precision=None):
    self.norm1 = layers.layer_norm(dim, norm_eps, rngs=rngs)
    self.attn = ClassAttention(dim, num_heads, rngs=rngs, qkv_bias=qkv_bias, qk_scale=qk_scale, dtype=dtype,
                               precision=precision)
    self.gamma_1 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
    self.gamma_2 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
    self.norm2 = layers.layer_norm(dim, norm_eps, rngs=rngs)
    self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype, precision=precision)

  def __call__(self, x, cls, *, return_map: bool = True):
    u = jnp.concatenate([cls, x], axis=1)
    y, probs = self.attn(self.norm1(u), return_map=return_map)
    cls = cls + (self.gamma_1[...] * y).astype(cls.dtype)
    cls = cls + (self.gamma_2[...] * self.mlp(self.norm2(cls))).astype(cls.dtype)
    return cls, probs


class _Identity(nnx.Module):
  """The final norm after `prune_intermediate_layers(prune_norm=True)`."""

  def __call__(self, x):
    return x


class VisionTransformer(nnx.Module):

  def __init__(self, *, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
               num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
               mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
               drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
               drop_path_schedule: str = "linear", pos_embed: str = "cls", stem: str = "patch",
               dynamic_img_size: bool = False,
               class_attn_depth: int = 0, class_attn_layer_scale: float | None = None, norm_eps: float = 1e-6,
               layer_scale: Any = None, talking_heads: Any = False, attn_scale: Any = False,
               reattention: Any = False, reattention_scale: bool = False, feat_scale: Any = None,
               feat_scale_bands: int = 2, feat_scale_impl: str = "auto", aug_shortcut: Any = None,
               num_cir: int = 4, circulant_impl: str = "auto", aug_paper_form: bool = False,
               scale_adjustment: float = 1.0, keep_rate: Any = 1.0, keep_rate_blocks: Sequence[int] | None = None,
               fuse_token: bool = False, dist_token: bool = False, scan_blocks: bool = True, remat: bool | str = "dots",
               param_layout: str = layout.PER_BLOCK, dtype=None, precision=None, rngs: nnx.Rngs | None = None):
    args = {k: v for k, v in locals().items() if k not in ("self", "rngs")}   # as options.OPTIONS names them
    rngs = rngs if rngs is not None else nnx.Rngs(params=0, dropout=1)
    # Consecutive blocks with the same graph run under one jax.lax.scan (with either parameter layout,
    # see param_layout below). On by default: compile time no longer
    # grows with depth, and on CPU the unrolled program of AugViT blocks also ran ~2x slower (XLA fused
    # and recomputed the erf-GELU shortcut paths). remat: what the backward pass of scanned blocks keeps
    # from the forward pass (jax.checkpoint): False keeps every residual; 'dots' (default) keeps the outputs
    # of the linear layers (matmuls without batch dims) and recomputes attention and the element-wise work
    # (measured 6-8% faster train step than False on CPU: fewer stacked residuals written and read);
    # True keeps only each block's input (least memory, one more forward pass).
    # param_layout: 'per_block' (default: `model.blocks[i]`) or 'stacked' (`model.block_stacks[j]`, one
    # Block per scan segment with a leading block axis; the trainer's layout), see models/layout.py.
    if remat not in (False, True, "dots"):
      raise ValueError(f"remat must be False, True or 'dots', got {remat!r}")
    layout.check(param_layout, scan_blocks)
    self.scan_blocks, self.remat = bool(scan_blocks), remat
    img = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
    if pos_embed not in ("cls", "patches"):
      raise ValueError(f"pos_embed must be 'cls' (slot for the class token) or 'patches', got {pos_embed!r}")
    if class_attn_depth and pos_embed != "patches":
      raise ValueError("class-attention blocks (CaiT) need pos_embed='patches': the class token only joins "
                       "in the class-attention stage")
    if stem not in ("patch", "cnn"):
      raise ValueError(f"stem must be 'patch' or 'cnn', got {stem!r}")
    self.embed_dim, self.depth, self.num_classes = embed_dim, depth, num_classes
    self.img_size, self.patch_size = img, patch_size
    # Any input whose sides are multiples of patch_size: pos_embed is resampled to its grid in the graph
    # (timm's dynamic_img_size: bicubic with antialias, prefix slots kept; see pos_embed_for).
    self.dynamic_img_size = bool(dynamic_img_size)
    self.pos_embed_mode = pos_embed
    stem_cls = layers.PatchEmbed if stem == "patch" else layers.ConvStem
    self.patch_embed = stem_cls(patch_size, in_chans, embed_dim, rngs=rngs, dtype=dtype, precision=precision)
    if img[0] % patch_size or img[1] % patch_size:
      raise ValueError(f"img_size {img} is not a multiple of patch_size {patch_size}")
    self.grid_size = (img[0] // patch_size, img[1] // patch_size)
    num_patches = self.grid_size[0] * self.grid_size[1]
    self.cls_token = nnx.Param(layers.trunc_normal_02(rngs.params(), (1, 1, embed_dim)))
    # DeiT's distillation token (DistilledVisionTransformer): a second prefix token with its own slot in
    # pos_embed and its own head; see __call__ for what the two heads return.
    if dist_token and (pos_embed != "cls" or class_attn_depth):
      raise ValueError("dist_token (DeiT distillation token) needs pos_embed='cls' and no class-attention blocks")
    self.dist_token = (nnx.Param(layers.trunc_normal_02(rngs.params(), (1, 1, embed_dim))) if dist_token
                       else nnx.data(None))
    n_pos = num_patches + (1 + bool(dist_token) if pos_embed == "cls" else 0)
    self.pos_embed = nnx.Param(layers.trunc_normal_02(rngs.params(), (1, n_pos, embed_dim)))
    self.pos_drop = nnx.Dropout(drop_rate, rngs=rngs)
    # The class token sits in the sequence of the self-attention blocks except in CaiT.
    self.num_prefix_tokens = 0 if class_attn_depth else 1 + bool(dist_token)

    if drop_path_schedule == "linear":
      dpr = [float(r) for r in np.linspace(0, drop_path_rate, depth)]
    elif drop_path_schedule == "constant":
      dpr = [float(drop_path_rate)] * depth
    else:
      raise ValueError(f"drop_path_schedule must be 'linear' or 'constant', got {drop_path_schedule!r}")
    # Every block's arguments, each option broadcast by its rule in options.OPTIONS.
    block_args = options.block_arguments(args, depth)
    keep, fs = block_args["keep_rate"], block_args["feat_scale"]
    if any(k < 1.0 for k in keep) and dist_token:
      raise ValueError("EViT token reorganisation keeps one prefix token; it does not take a dist_token")
    if any(k < 1.0 for k in keep) and self.num_prefix_tokens == 0:
      raise ValueError("EViT token reorganisation scores tokens by the class token's attention; "
                       "it cannot run in CaiT's self-attention stage, which has no class token")
    if feat_scale_bands > 2 and any(k < 1.0 for k in keep):
      first_reorg = min(i for i, k in enumerate(keep) if k < 1.0)
      if any(f for f in fs[first_reorg + 1:]):
        raise ValueError("FeatScale with more than 2 bands works on the patch grid, which EViT token "
                         "reorganisation breaks; use feat_scale_bands=2 with keep_rate < 1")
    self.blocks = nnx.List([
        Block(embed_dim, num_heads, rngs=rngs, drop_path=dpr[i], drop_path_active=drop_path_rate > 0,
              **{k: v[i] for k, v in block_args.items()})
        for i in range(depth)])
    self.block_stacks = nnx.data(None)
    layout.set_layout(self, param_layout)
    if class_attn_depth:
      ls = class_attn_layer_scale if class_attn_layer_scale is not None else block_args["layer_scale"][-1]
      self.blocks_token_only = nnx.List([
          ClassAttentionBlock(embed_dim, num_heads, rngs=rngs, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                              qk_scale=qk_scale, norm_eps=norm_eps, layer_scale=ls if ls is not None else 1e-5,
                              dtype=dtype, precision=precision)
          for _ in range(class_attn_depth)])
    else:
      self.blocks_token_only = nnx.data(None)
    self.norm = layers.layer_norm(embed_dim, norm_eps, rngs=rngs)
    self.head = (layers.linear(embed_dim, num_classes, rngs=rngs, precision=precision)
                 if num_classes else nnx.data(None))
    self.head_dist = (layers.linear(embed_dim, num_classes, rngs=rngs, precision=precision)
                      if num_classes and dist_token else nnx.data(None))
    # nnx's train()/eval() switch (as for Dropout): a distilled model returns both heads' logits in training
    # and their average in evaluation, as DeiT's DistilledVisionTransformer does with torch's module.training.
    self.deterministic = False

  @property
  def param_layout(self) -> str:
    """'per_block' (`self.blocks`) or 'stacked' (`self.block_stacks`); see models/layout.py."""
    return layout.layout_of(self)

  @property
  def stack_sizes(self) -> tuple[int, ...]:
    """Blocks per stack in the stacked layout; () in the per-block layout."""
    return layout.stack_sizes(self)

  def block_list(self) -> list:
    """Per block (length depth), the module holding it: the Block itself or the stack of its segment."""
    return layout.block_list(self)

  def _run_functional(self, graphdef, state, n: int, x, grid, return_map):
    """Run n blocks of one graph as a pure function of their state, stacked along a leading axis when
    n > 1 (one traced body under jax.lax.scan; jax.checkpoint with remat). Returns (x, tokens, maps, reorg,
    changed): `changed` holds, in the layout of `state`, only the variables the blocks changed (BatchNorm
    statistics, RNG counters of active dropout), or None; state they did not touch must not be written back
    (it may belong to an outer trace, e.g. parameters inside a jax.grad)."""
    num_prefix = self.num_prefix_tokens
    changed_paths: list = []

    def body(carry, state):
      # Traced once: a variable the block does not mutate still holds the very input tracer afterwards.
      old_values = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
      blk = nnx.merge(graphdef, state)
      y, aux = blk(carry, grid=grid, num_prefix=num_prefix, return_map=return_map)
      changed = [(p, v) for p, v in nnx.to_flat_state(nnx.state(blk)) if v.get_value() is not old_values.get(p)]
      changed_paths[:] = [p for p, _ in changed]
      # Per-block outputs only of what is used: the block's tokens when intermediates are asked for, and the
      # state it changed (not a stacked copy of every parameter).
      return y, (y if return_map else None, aux["attn"], aux["reorg"], nnx.from_flat_state(changed))

    if self.remat == "dots":
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    elif self.remat:
      body = jax.checkpoint(body)
    if n == 1:
      x, (_, amap, reorg, new) = body(x, state)
      return x, [x], [amap], [reorg], (new if changed_paths else None)
    x, (toks, maps, _, new) = jax.lax.scan(body, x, state)
    toks = [toks[i] for i in range(n)] if toks is not None else [None] * (n - 1) + [x]
    return x, toks, [None if maps is None else maps[i] for i in range(n)], [None] * n, \
        (new if changed_paths else None)

  def _run_blocks(self, x, grid, return_map: bool):
    """All self-attention blocks. Returns (x, tokens, maps, reorg), one entry per block."""
    tokens, maps, reorgs = [], [], []

    def add(toks, amaps, reorg):
      tokens.extend(toks)
      maps.extend(amaps)
      reorgs.extend(reorg)

    for seg in layout.segments_to_run(self):
      if seg.block is not None and self.remat is not True:
        x, aux = seg.block(x, grid=grid, num_prefix=self.num_prefix_tokens, return_map=return_map)
        add([x], [aux["attn"]], [aux["reorg"]])
      else:
        graphdef, state = seg.functional()
        x, toks, amaps, reorg, new = self._run_functional(graphdef, state, seg.n, x, grid, return_map)
        if new is not None:
          seg.write_back(new)
        add(toks, amaps, reorg)
      if reorgs[-1] is not None:
        grid = None  # the patch grid no longer exists after a reorganisation
    return x, tokens, maps, reorgs

  def _run_blocks_taking(self, x, grid, take: Sequence[int], stop: int):
    """Blocks 0 .. stop - 1, keeping the outputs of the blocks in `take` only. A scanned segment runs in
    parts cut after each taken block and after block stop - 1 (`layout.Segment.part`), so each taken output is
    a part's last carry and no block after `stop - 1` is traced. Returns (x, {block: tokens}, {block: (EViT
    kept indices (B, k), tokens after)})."""
    take = set(take)
    outs, reorgs = {}, {}
    start = 0
    for seg in layout.segments_to_run(self):
      if start >= stop:
        break
      end = min(start + seg.n, stop)
      a = start
      for c in sorted({i + 1 for i in take if start <= i < end} | {end}):
        part = seg.part(a - start, c - a)
        if part.block is not None and self.remat is not True:
          x, aux = part.block(x, grid=grid, num_prefix=self.num_prefix_tokens)
          reorg = aux["reorg"]
        else:
          graphdef, state = part.functional()
          x, _, _, reorg_list, new = self._run_functional(graphdef, state, part.n, x, grid, False)
          if new is not None:
            part.write_back(new)
          reorg = reorg_list[-1]   # only a one-block part can reorganise (such blocks stand alone)
        if reorg is not None:
          reorgs[c - 1] = (reorg["idx"], x.shape[1])
          grid = None
        if c - 1 in take:
          outs[c - 1] = x
        a = c
      start += seg.n
    return x, outs, reorgs

  @property
  def feature_info(self) -> list[dict]:
    """Per self-attention block: its channels, stride in pixels and name, as timm's `feature_info`."""
    return [dict(num_chs=self.embed_dim, reduction=self.patch_size, module=f"blocks.{i}")
            for i in range(self.depth)]

  def forward_intermediates(self, images, indices: int | Sequence[int] | None = None, *, norm: bool = False,
                            output_fmt: str = "NHWC", intermediates_only: bool = False,
                            return_prefix_tokens: bool = False, stop_early: bool = True,
                            return_token_indices: bool = False):
    """Outputs of chosen self-attention blocks, with timm's semantics (`VisionTransformer` and `Cait`
    `forward_intermediates`).

    indices: None (every block), k (the last k) or a list (negative from the end); outputs in block order.
    norm: apply the final norm to each output. output_fmt: 'NHWC' (B, h, w, D; default), 'NCHW' or 'NLC'
    (B, h*w, D), with (h, w) the input's patch grid. The prefix tokens (class, distillation; none in CaiT's
    self-attention stage) are split off; return_prefix_tokens=True returns (tokens, prefix (B, P, D)) pairs.
    stop_early (default True; timm's default is False): blocks after the last requested one do not run, and
    the final features are then those of the last run block. Returns (final_features, intermediates), the
    final features being the normalised (B, N, D) sequence after the last run block (in CaiT after its
    class-attention stage, class token first), or the list only with intermediates_only=True.

    EViT: after a reorganising block the tokens are the kept ones (and the fused one) in score order, no
    grid: ask for such blocks with output_fmt='NLC' (a grid format raises), and with
    return_token_indices=True each entry ends with their positions (B, L) int32 in the input's row-major patch
    grid (-1 marks the fused token), e.g. to scatter them back to a map.
    """
    features.check_format(output_fmt)
    take, last = features.take_indices(self.depth, indices)
    x, grid = self.embed(images)
    x, outs, reorgs = self._run_blocks_taking(x, grid, take, last + 1 if stop_early else self.depth)
    p = self.num_prefix_tokens
    b = x.shape[0]
    where = jnp.broadcast_to(jnp.arange(grid[0] * grid[1], dtype=jnp.int32), (b, grid[0] * grid[1]))
    intermediates, reorganised_at = [], None
    for i in range(last + 1):
      if i in reorgs:
        idx, n_after = reorgs[i]
        where = jnp.take_along_axis(where, idx.astype(jnp.int32), axis=1)
        if n_after - p > where.shape[1]:   # the fused token, appended last
          where = jnp.concatenate([where, jnp.full((b, 1), -1, jnp.int32)], axis=1)
        reorganised_at = i
      if i not in outs:
        continue
      y = self.norm(outs[i]) if norm else outs[i]
      if reorganised_at is not None and output_fmt != "NLC":
        raise ValueError(f"block {i} follows the EViT token reorganisation of block {reorganised_at}: its "
                         f"tokens form no patch grid; use output_fmt='NLC' (with return_token_indices=True "
                         f"for their grid positions)")
      entry = (features.to_format(y[:, p:], grid, output_fmt),)
      if return_prefix_tokens and p:
        entry += (y[:, :p],)
      if return_token_indices:
        entry += (where,)
      intermediates.append(entry[0] if len(entry) == 1 else entry)
    if intermediates_only:
      return intermediates
    if self.blocks_token_only is not None:
      cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.embed_dim)).astype(x.dtype)
      for blk in self.blocks_token_only:
        cls, _ = blk(x, cls)
      x = jnp.concatenate([cls, x], axis=1)
    return self.norm(x), intermediates

  def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                prune_head: bool = True) -> list[int]:
    """Drop what `forward_intermediates(indices)` does not need, in place, as timm: the blocks after the last
    index (a stack of the stacked layout is cut), with prune_norm the final norm (an identity), with
    prune_head the classifier (and CaiT's class-attention stage; `model(x)` then returns the normalised
    first token of the last block). Returns the kept indices."""
    take, last = features.take_indices(self.depth, indices)
    keep = last + 1
    if self.param_layout == layout.STACKED:
      stacks, start = [], 0
      for s in self.block_stacks:
        n = layout.stack_size(s)
        if start + n <= keep:
          stacks.append(s)
        elif start < keep:
          graphdef, state = nnx.split(s)
          stacks.append(nnx.merge(graphdef, jax.tree.map(lambda a: a[:keep - start], state)))
        start += n
      self.block_stacks = nnx.List(stacks)
    else:
      self.blocks = nnx.List(list(self.blocks)[:keep])
    self.depth = keep
    if prune_norm:
      self.norm = _Identity()
    if prune_head:
      self.head = nnx.data(None)
      if getattr(self, "head_dist", None) is not None:
        self.head_dist = nnx.data(None)
      self.blocks_token_only = nnx.data(None)
      self.num_classes = 0
    return take

  def pos_embed_for(self, grid: tuple[int, int], hw: tuple[int, int] | None = None):
    """The position embedding of a `grid` of patches (from an input of `hw` pixels): `pos_embed` itself at the
    grid the model was built for; else, with dynamic_img_size=True, its patch part resampled to `grid` as
    timm's `resample_abs_pos_embed` does (torch's bicubic with antialias, the prefix slots kept; the one
    implementation in models/position.py, traced here), and an error without it."""
    grid = tuple(int(g) for g in grid)
    if grid == self.grid_size:
      return self.pos_embed[...]
    hw = tuple(hw) if hw is not None else tuple(g * self.patch_size for g in grid)
    if not self.dynamic_img_size:
      raise ValueError(f"input gives a {grid} patch grid but the model was built for {self.grid_size} "
                       f"(img_size={self.img_size}); build it with img_size=... (position embeddings are "
                       f"resized when loading weights, see vit_jax_fix.interop) or with dynamic_img_size=True")
    if hw[0] % self.patch_size or hw[1] % self.patch_size:
      raise ValueError(f"dynamic_img_size: input {hw} is not a multiple of patch_size {self.patch_size}")
    pos = self.pos_embed[...]
    prefix = pos.shape[1] - self.grid_size[0] * self.grid_size[1]
    return position.resize_pos_embed(pos, grid, num_prefix=prefix, old_grid=self.grid_size,
                                     method="bicubic", antialias=True)

  def embed(self, images):
    """images (B, H, W, C) -> tokens (B, N0, D) entering the first block, and the patch grid."""
    x, grid = self.patch_embed(images)
    pos_embed = self.pos_embed_for(grid, images.shape[1:3])
    b = x.shape[0]
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.embed_dim)).astype(x.dtype)
    if self.dist_token is not None:
      cls = jnp.concatenate([cls, jnp.broadcast_to(self.dist_token[...], cls.shape).astype(x.dtype)], axis=1)
    if self.pos_embed_mode == "cls":
      x = jnp.concatenate([cls, x], axis=1) + pos_embed.astype(x.dtype)
    else:
      x = x + pos_embed.astype(x.dtype)
      if self.num_prefix_tokens:
        x = jnp.concatenate([cls, x], axis=1)
    return self.pos_drop(x), grid

  def __call__(self, images, *, return_intermediates: bool = False):
    """images: (B, H, W, C) float. Returns logits (B, num_classes), or pre-logits (B, D) when
    num_classes=0; with return_intermediates=True, (logits, intermediates) where intermediates holds
    'embed' (B, N0, D), 'tokens' (list of block outputs (B, N_i, D)), 'attn' (list of post-softmax maps
    (B, H, N_i, N_i)), 'reorg' (EViT: list of {'idx', 'cls_attn'} or None), 'cls_tokens' and 'cls_attn'
    (CaiT class-attention outputs and maps) and 'pre_logits' (B, D).
    With dist_token (DeiT distilled): in training mode (`model.train()`, the default) logits are the pair
    (head(x_cls), head_dist(x_dist)); in evaluation mode (`model.eval()`) their average."""
    x, grid = self.embed(images)
    inter = {"embed": x, "tokens": [], "attn": [], "reorg": [], "cls_tokens": [], "cls_attn": []}
    x, inter["tokens"], inter["attn"], inter["reorg"] = self._run_blocks(x, grid, return_intermediates)
    if self.blocks_token_only is not None:
      cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, self.embed_dim)).astype(x.dtype)
      for blk in self.blocks_token_only:
        cls, probs = blk(x, cls, return_map=return_intermediates)
        inter["cls_tokens"].append(cls)
        inter["cls_attn"].append(probs)
      x = jnp.concatenate([cls, x], axis=1)
    normed = self.norm(x)
    pre_logits = normed[:, 0]
    inter["pre_logits"] = pre_logits
    out = self.head(pre_logits) if self.head is not None else pre_logits
    if self.head_dist is not None:
      out_dist = self.head_dist(normed[:, 1])
      out = (out + out_dist) / 2 if self.deterministic else (out, out_dist)
    return (out, inter) if return_intermediates else out
