"""The option table of the ViT backbone (`models/options.py`) is what the code uses: it agrees with the
constructor signatures, its per-block rules build the blocks, the timm check reads it, and the README's
model-options table is generated from it."""
import inspect
import pathlib

import pytest

from vit_jax_fix.interop.timm_models import TimmUnsupported, timm_config
from vit_jax_fix.models import options, vit
from vit_jax_fix.models.registry import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- options-table:begin -->", "<!-- options-table:end -->"
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5, depth=4)


def _params(cls, skip=()):
  return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
          if k not in ("self", "rngs", *skip)}


def test_table_and_signatures_agree():
  """One row per VisionTransformer argument, same default; every Block argument fed by exactly one row."""
  backbone = _params(vit.VisionTransformer)
  assert [o.name for o in options.OPTIONS if o.name not in backbone] == []
  assert [k for k in backbone if k not in options.BY_NAME] == []
  assert len(options.BY_NAME) == len(options.OPTIONS)
  for o in options.OPTIONS:
    assert backbone[o.name] == o.default, o.name
  # dim, num_heads: the backbone's own; drop_path(_active): the backbone's drop-path schedule.
  block = _params(vit.Block, skip=("dim", "num_heads", "drop_path", "drop_path_active"))
  fed = [o.block_arg for o in options.OPTIONS if o.to_block]
  assert sorted(fed) == sorted(block)
  for o in options.OPTIONS:
    if o.to_block:
      assert block[o.block_arg] == o.default, o.name
  for o in options.OPTIONS:
    assert o.broadcast in (options.MODEL, options.EACH, options.SELECT) or \
        o.broadcast.removeprefix("at:") in options.BY_NAME, o.name
    assert o.broadcast == options.MODEL or o.to_block, f"{o.name}: a per-block rule for an option blocks never see"
    assert o.row is None or o.row in options.BY_NAME, o.name


def test_per_block_rules_build_the_blocks():
  args = dict(_params(vit.VisionTransformer), depth=4, talking_heads="last:2", attn_scale=[0, -1],
              layer_scale=[0.1, 0.2, 0.3, 0.4], reattention="first:1", keep_rate=0.5, keep_rate_blocks=(2,),
              mlp_ratio=2.0, drop_rate=0.1)
  block_args = options.block_arguments(args, 4)
  assert block_args["talking_heads"] == (False, False, True, True)
  assert block_args["attn_scale"] == (True, False, False, True)          # block indices, negative from the end
  assert block_args["layer_scale"] == (0.1, 0.2, 0.3, 0.4)
  assert block_args["reattention"] == (True, False, False, False)
  assert block_args["keep_rate"] == (1.0, 1.0, 0.5, 1.0)                 # at keep_rate_blocks, the default elsewhere
  assert block_args["mlp_ratio"] == (2.0,) * 4 and block_args["drop"] == (0.1,) * 4
  with pytest.raises(ValueError, match="give keep_rate as one value when keep_rate_blocks"):
    options.block_arguments(dict(args, keep_rate=[0.5] * 4), 4)
  with pytest.raises(ValueError, match="layer_scale has 3 entries but the model has 4 blocks"):
    options.block_arguments(dict(args, layer_scale=[0.1] * 3), 4)
  with pytest.raises(ValueError, match="'last:K' or 'first:K' with K <= depth"):
    options.block_arguments(dict(args, reattention="last:5"), 4)
  model = create_model("deit_small_patch16_224", attn_scale="last:1", layer_scale=[0.1, 0.2, 0.3, 0.4], **SMALL)
  assert [b.attn.lamb is not None for b in model.blocks] == [False, False, False, True]
  assert [float(b.gamma_1[0]) for b in model.blocks] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_timm_check_reads_the_table():
  """Every option timm lacks is refused at any non-default value (its README examples), in any block; options
  that change nothing timm sees are accepted."""
  name = "deit_small_patch16_224"
  lacks = options.timm_lacks()
  assert {"attn_scale", "feat_scale", "reattention", "aug_shortcut", "keep_rate", "stem"} <= {o.name for o in lacks}
  for o in lacks:
    assert o.examples(), f"{o.name}: a non-default example is needed to test the timm check"
    for value in o.examples():
      with pytest.raises(TimmUnsupported, match=o.name):
        timm_config(name, **{o.name: value})
  with pytest.raises(TimmUnsupported, match="attn_scale"):
    timm_config(name, attn_scale=[0])                       # block 0 only, given as an index
  timm_config(name, attn_scale=[False] * 12, keep_rate=[1.0] * 12, norm_eps=1e-6)
  for o in options.OPTIONS:
    if o.timm == options.ANY:
      for value in o.examples():
        timm_config(name, **{o.name: value})


def test_readme_options_table_is_generated_from_the_table():
  readme = (ROOT / "README.md").read_text()
  assert BEGIN in readme and END in readme, f"README.md needs the markers {BEGIN} and {END} around the table"
  section = readme.split(BEGIN, 1)[1].split(END, 1)[0]
  assert section.strip() == options.readme_table().strip(), (
      "README's model-options table differs from vit_jax_fix.models.options.readme_table(); paste:\n"
      + options.readme_table())
