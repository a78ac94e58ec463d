"""The command line of programs that take a training config (`main.py`, `python -m vit_jax_fix.evaluate`).

    python main.py --config configs/deit_s.py:demo --workdir W \\
        --config.batch_size=64 --config.model.overrides.feat_scale=double \\
        --config.model.overrides.keep_rate_blocks='(3,6,9)' --config.model.overrides.dtype=bfloat16

`--config FILE[:ARG]` loads `get_config(ARG)` from FILE; `--config.KEY=VALUE` overrides one key:
- every section except `model.overrides` is strict: a key the base config (`train/config.py`) does not have is
  an error naming the nearest valid key, and VALUE is parsed as the key's type;
- `model.overrides` takes any argument of the model's constructor, whether or not the config file sets it,
  checked against the model (`registry.check_overrides`: a typo gets the nearest name). VALUE is read as a
  Python literal (`0.6`, `True`, `(3,6,9)`, `None`), else kept as a string (`bfloat16`, `per_block`).

Errors a user can fix (a bad flag, a config that does not load, an unknown key, a missing dataset, ...) end the
program with the message alone on stderr and exit code 2 for usage/config errors, 1 for the others
(`vit_jax_fix.errors`).
"""
from __future__ import annotations

import re

from absl import app, flags
from ml_collections import config_flags

from vit_jax_fix import errors
from vit_jax_fix.train import config as config_lib

_OVERRIDE = re.compile(r"^--?(?:no)?{name}\.([^=]+)")


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS, name: str = "config", sys_argv=None):
  """`--config FILE[:ARG]` with `--config.KEY=VALUE` overrides (new keys reach the validation below instead
  of failing inside ml_collections: the config is left unlocked and `validate` checks every key)."""
  return config_flags.DEFINE_config_file(name, None, "Training config file (configs/*.py[:arg]).",
                                         flag_values=flag_values, lock_config=False,
                                         accept_new_attributes=True, sys_argv=sys_argv)


def define_main_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """main.py's flags: --config (with overrides) and --workdir, both required."""
  define_config_flag(flag_values, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the saved config go here.",
                      flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def override_paths(argv, name: str = "config") -> list[str]:
  """The KEY of every `--config.KEY=VALUE` in argv (in order)."""
  pattern = re.compile(_OVERRIDE.pattern.format(name=re.escape(name)))
  return [m.group(1) for m in map(pattern.match, argv) if m]


def parse_flags(argv, flag_values: flags.FlagValues = flags.FLAGS, name: str = "config") -> list[str]:
  """Parses argv like absl, but every mistake a user can fix is a `UsageError` with a one-line message.
  Returns the positional arguments (argv[0] first), as absl's parser does."""
  for path in override_paths(argv[1:], name):
    config_lib.check_key_path(path)
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    user = errors.find_user_error(e, deepest=True, through_context=True)
    if user is not None:
      raise user from None
    raise errors.UsageError(f"{e}\nPass --helpfull to see every flag.") from None
  if flag_values[name].present or flag_values[name].value is not None:
    try:
      config = flag_values[name].value
      config.keys()   # a config file that failed to load raises here (ml_collections defers the error)
    except OSError as e:
      raise errors.UsageError(f"--{name}={flag_values[name].config_filename!r} could not be loaded: "
                              f"{e.__cause__ or e}") from None
    config_lib.validate(config)
  return rest


def run(main, prog: str | None = None) -> None:
  """`absl.app.run(main)` with `parse_flags`; user errors from parsing or from `main` exit cleanly."""
  errors.exit_on_user_error(app.run, prog=prog)(main, flags_parser=parse_flags)

