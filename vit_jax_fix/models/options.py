"""The options of the ViT backbone (`vit.VisionTransformer`), one row each: the one table a new fix is added to.

Each row says, for one constructor argument:

* its default (tests assert the constructor signature and `vit.Block`'s agree with the table);
* whether and how the blocks take it (`to_block`, `broadcast`): one value for the model (MODEL), one value or
  one per block (EACH), as EACH and, for a boolean fix, also 'last:K' / 'first:K' or a list of block indices
  (SELECT, `select_blocks`), or one value at the blocks another option lists and the default elsewhere
  ('at:<option>': EViT's keep_rate at keep_rate_blocks). `block_arguments` derives every block's arguments;
* what timm makes of it (`timm`): LACKS (no timm model has it: a model is representable in timm only with the
  default, which `interop.timm_models` checks from this table), ANY (any value: it changes only training,
  numerics or execution, or matters only together with an option timm lacks), or how timm takes it;
* its README text: the row of the model-options table it belongs to (`row`), an example (`example`: Python
  literals, alternatives separated by '|'; the first is a non-default value tests build), what it does
  (`doc`) and the official quirk reproduced by default (`official`). `readme_table()` renders the table.

Adding a block fix: its argument and its computation in `vit.Block`, the argument in the
`VisionTransformer` signature (override validation reads the signature), and one row here.
"""
from __future__ import annotations

import ast
import dataclasses
import math
from typing import Any

import numpy as np

from vit_jax_fix.models import layers, layout

MODEL, EACH, SELECT = "model", "each", "select"   # broadcast rules; 'at:<option>' is the fourth
LACKS, ANY = "lacks", "any"                       # what timm makes of an option, besides a description


@dataclasses.dataclass(frozen=True)
class Option:
  name: str
  default: Any
  broadcast: str = MODEL         # one value -> the blocks' values: MODEL, EACH, SELECT or 'at:<option>'
  to_block: bool | str = False   # feeds the Block argument of the same name (True) or of this name
  timm: str = ANY                # LACKS, ANY or how timm takes it
  row: str | None = None         # README model-options row (the name of its first option); None: not listed
  example: str = ""              # Python literals, alternatives separated by '|' (README and tests)
  doc: str = ""                  # what it does (README)
  official: str = ""             # the official quirk reproduced by default (README)

  @property
  def block_arg(self) -> str | None:
    if not self.to_block:
      return None
    return self.name if self.to_block is True else self.to_block

  def values(self, value, depth: int, args: dict) -> tuple:
    """The value of each of `depth` blocks (`args`: every backbone argument, for 'at:<option>')."""
    if self.broadcast == MODEL:
      return (value,) * depth
    if self.broadcast == EACH:
      return layers.as_tuple(value, depth, self.name)
    if self.broadcast == SELECT:
      return select_blocks(value, depth, self.name)
    where = self.broadcast.removeprefix("at:")
    if args.get(where) is None:
      return layers.as_tuple(value, depth, self.name)
    if isinstance(value, (list, tuple)):
      raise ValueError(f"give {self.name} as one value when {where} selects the blocks")
    chosen = {i % depth for i in args[where]}
    return tuple(value if i in chosen else self.default for i in range(depth))

  def is_default(self, value) -> bool:
    """Whether `value` (one, or one per block) is the default everywhere: numbers compare with isclose."""
    if isinstance(value, (list, tuple)):
      return all(self.is_default(v) for v in value)
    if isinstance(value, (int, float, np.number)) and isinstance(self.default, (int, float)) \
        and not isinstance(self.default, bool) and not isinstance(value, bool):
      return math.isclose(float(value), float(self.default))
    return value == self.default

  def examples(self) -> list:
    """The README example values that are Python literals (in order)."""
    out = []
    for text in self.example.split("|"):
      try:
        out.append(ast.literal_eval(text))
      except (ValueError, SyntaxError):
        pass
    return out


def select_blocks(value: Any, depth: int, name: str) -> tuple:
  """Per-block values from one value, a per-block list, 'last:K' / 'first:K', or a list of indices."""
  if isinstance(value, str) and ":" in value:
    where, _, k = value.partition(":")
    if where not in ("last", "first") or not k.isdigit() or int(k) > depth:
      raise ValueError(f"{name}={value!r}: use 'last:K' or 'first:K' with K <= depth ({depth})")
    k = int(k)
    return tuple((i >= depth - k) if where == "last" else (i < k) for i in range(depth))
  if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, np.integer))
                                                         and not isinstance(v, bool) for v in value):
    # A list of block indices (negative counts from the end); a list of booleans is the per-block form.
    chosen = {i % depth for i in value}
    if any(not -depth <= i < depth for i in value):
      raise ValueError(f"{name}: block indices {list(value)} out of range for depth {depth}")
    return tuple(i in chosen for i in range(depth))
  return layers.as_tuple(value, depth, name)


_SAME = "same argument"
O = Option
OPTIONS: tuple[Option, ...] = (
    # --- the backbone
    O("img_size", 224, timm=_SAME, doc="input size, int or (H, W)"),
    O("dynamic_img_size", False, timm=_SAME, example="True",
      doc="any input whose sides are multiples of patch_size: pos_embed resampled in the graph (bicubic)"),
    O("patch_size", 16, timm=_SAME),
    O("in_chans", 3, timm=_SAME),
    O("num_classes", 1000, timm=_SAME, doc="0: the model returns pre-logits"),
    O("embed_dim", 768, timm=_SAME),
    O("depth", 12, timm=_SAME),
    O("num_heads", 12, timm=_SAME),
    O("mlp_ratio", 4.0, to_block=True, timm=_SAME),
    O("qkv_bias", True, to_block=True, timm=_SAME),
    O("qk_scale", None, to_block=True, timm="only head_dim ** -0.5"),
    O("drop_rate", 0.0, to_block="drop"),
    O("attn_drop_rate", 0.0, to_block="attn_drop"),
    O("drop_path_rate", 0.0, doc="the last block's drop-path rate (per block by drop_path_schedule)"),
    O("drop_path_schedule", "linear", example="'linear'|'constant'"),
    O("norm_eps", 1e-6, to_block=True, timm=LACKS, example="1e-5"),
    O("pos_embed", "cls", timm="`no_embed_class`", row="pos_embed", example="'patches'|'cls'",
      doc="position embedding: `'cls'` (DeiT) has a slot for the class token, added after concatenation; "
          "`'patches'` (DeiT III, CaiT) covers the patches only, the class token is concatenated afterwards"),
    O("class_attn_depth", 0, timm="Cait's `depth_token_only`", row="class_attn_depth", example="2",
      doc="CaiT class-attention blocks after the self-attention blocks (the class token joins only there)"),
    O("dist_token", False, timm="`VisionTransformerDistilled` (deit_*_distilled)", example="True",
      doc="DeiT's distillation token and `head_dist`: both heads' logits in training, their mean in eval"),
    O("class_attn_layer_scale", None, row="class_attn_depth", example="1e-5",
      doc="their LayerScale init (default: the last block's `layer_scale`, else 1e-5)"),
    # --- the fixes, options of every block
    O("layer_scale", None, EACH, True, timm="`init_values` (one value)", row="layer_scale", example="1e-4",
      doc="LayerScale (DeiT III, CaiT)", official="per-channel gamma_1 / gamma_2"),
    O("talking_heads", False, SELECT, True, timm="Cait only", row="talking_heads", example="True",
      doc="CaiT talking-heads attention", official="proj_l before, proj_w after the softmax"),
    O("attn_scale", False, SELECT, True, timm=LACKS, row="attn_scale", example="True",
      doc="AttnScale: per-head gain on the high-pass part of the attention map; fused-kernel form "
          "`(1+λ)Av − λ·mean(v)`", official="N = every token of that attention"),
    O("feat_scale", None, EACH, True, timm=LACKS, row="feat_scale", example="'double'|'single'",
      doc="FeatScale as FFT band gains", official="ViT code adds the term twice (`'double'`)"),
    O("feat_scale_bands", 2, to_block=True, row="feat_scale", example="K",
      doc="K > 2 = radial bands of the 2-D FFT over the patch grid"),
    O("feat_scale_impl", "auto", to_block=True, row="feat_scale", example="'auto'|'fft'|'mean'",
      doc="`'auto'` computes two bands by their closed form (the token mean; same function, no FFT over "
          "197 tokens)"),
    O("reattention", False, SELECT, True, timm=LACKS, row="reattention", example="True|'last:K'|[indices]",
      doc="DeepViT re-attention (head mixing + BatchNorm over heads)", official="BatchNorm over heads"),
    O("reattention_scale", False, to_block=True, row="reattention",
      doc="`reattention_scale`: the mixed map times the attention scale (DeepViT-S)"),
    O("aug_shortcut", None, EACH, True, timm=LACKS, row="aug_shortcut",
      example="'linear'|'circulant'|'linear2'|'circulant2'", doc="AugViT augmented shortcuts",
      official="paths read LN(x); ×3/4 in two-path modes"),
    O("num_cir", 4, to_block=True, row="aug_shortcut", doc="`num_cir` circulant blocks per projection"),
    O("circulant_impl", "auto", to_block=True, row="aug_shortcut", example="'auto'|'fft'|'dense'",
      doc="`circulant_impl` auto: FFT on CPU, dense elsewhere"),
    O("aug_paper_form", False, to_block=True, row="aug_shortcut",
      doc="`aug_paper_form`: the paper's form (paths read the sub-layer input, no rescale)"),
    O("scale_adjustment", 1.0, to_block=True, timm=LACKS, row="scale_adjustment", example="0.5",
      doc="DeepViT-S/L LN(a·x), branch / a"),
    O("stem", "patch", timm=LACKS, row="scale_adjustment", example="'cnn'", doc="CNN patch stem"),
    O("keep_rate", 1.0, "at:keep_rate_blocks", True, timm=LACKS, row="keep_rate", example="0.7",
      doc="EViT token reorganisation (static shapes)", official="`ceil`, fused token last"),
    O("keep_rate_blocks", None, row="keep_rate", example="(3,6,9)"),
    O("fuse_token", False, to_block=True, row="keep_rate", example="True"),
    # --- numerics and execution: the same weights, the same function
    O("dtype", None, to_block=True, row="dtype", example="'bfloat16'",
      doc="compute dtype (params stay fp32; norms and softmax fp32)"),
    O("precision", None, to_block=True, row="dtype", example="'highest'"),
    O("scan_blocks", True, row="scan_blocks", example="True",
      doc="execution: identical consecutive blocks under one `lax.scan`"),
    O("remat", "dots", row="scan_blocks", example="'dots'|False|True",
      doc="what the backward pass keeps (default: linear layers' outputs)"),
    O("param_layout", layout.PER_BLOCK, row="param_layout", example="'per_block'|'stacked'",
      doc="storage: one parameter set per block (`model.blocks[i]`, default) or one per scan segment with a "
          "leading block axis (`model.block_stacks[j]`, the trainer's layout); same function, "
          "`models.layout.with_param_layout` converts, interop accepts both"),
)
del O
BY_NAME = {o.name: o for o in OPTIONS}


def block_arguments(args: dict, depth: int) -> dict[str, tuple]:
  """{Block argument: its value in each of `depth` blocks} from the backbone's arguments, by each row's rule."""
  return {o.block_arg: o.values(args[o.name], depth, args) for o in OPTIONS if o.to_block}


def timm_lacks() -> tuple[Option, ...]:
  """The options no timm model has: a model is a timm model only where they keep their default."""
  return tuple(o for o in OPTIONS if o.timm == LACKS)


def _broadcast_text(o: Option) -> str:
  if o.broadcast == EACH:
    return "list"
  if o.broadcast == SELECT:
    return "list, `'last:K'`, `'first:K'`, indices"
  if o.broadcast.startswith("at:"):
    return f"list, or one value at `{o.broadcast[3:]}`"
  return ""


def _timm_text(o: Option) -> str:
  return {LACKS: "no", ANY: "any value"}.get(o.timm, o.timm)


def readme_table() -> str:
  """The README's model-options table (markdown), one row per `row`, its options in table order."""
  rows: dict[str, list[Option]] = {}
  for o in OPTIONS:
    if o.row is not None:
      rows.setdefault(o.row, []).append(o)
  cell = lambda text: text.replace("|", "\\|")
  lines = ["| override | what it does | official default reproduced | per block | timm |",
           "|---|---|---|---|---|"]
  for opts in rows.values():
    first = opts[0]
    override = ", ".join(f"`{o.name}={o.example}`" if o.example else f"`{o.name}`" for o in opts)
    doc = "; ".join(o.doc for o in opts if o.doc)
    official = "; ".join(o.official for o in opts if o.official)
    lines.append("| " + " | ".join(cell(t) for t in (override, doc, official, _broadcast_text(first),
                                                       _timm_text(first))) + " |")
  return "\n".join(lines) + "\n"
