"""Errors a user can fix, and how the command-line programs report them.

A `UserError` is something the person running the program can fix: a config value or key, a missing dataset,
weights file or checkpoint, a checkpoint of another model, a non-finite loss. `main.py`, `convert`, `diagnose`
and `evaluate` print its message alone on stderr and exit non-zero, without a traceback: exit code 2 for a
`UsageError` (command-line arguments and config: the command as typed cannot work), 1 for the others (the
command is right, the world around it is not: data, files, a diverging run). Any other exception is a bug and
keeps its traceback. `VIT_JAX_FIX_DEBUG=1` shows the traceback of user errors too.

Library code raises the most specific class that fits; the classes also derive from the built-in exception a
caller would have caught before (`ValueError`, `KeyError`, `FileNotFoundError`, ...), so `except ValueError`
keeps working.
"""
from __future__ import annotations

import functools
import os
import sys

DEBUG_ENV = "VIT_JAX_FIX_DEBUG"


class UserError(Exception):
  """Something the user can fix; the CLIs print the message and exit with `exit_code`."""
  exit_code = 1

  def __str__(self):
    # KeyError quotes its message; a user error is read as a sentence.
    return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UsageError(UserError):
  """The command as typed cannot work: a command-line argument or a config key or value (exit code 2)."""
  exit_code = 2


class ConfigError(UsageError, ValueError):
  """A config key or value that cannot work (for this model, data or device count)."""


class ConfigKeyError(UsageError, KeyError, TypeError):
  """An unknown config key, model name or model option; the message names the nearest valid one. (A
  `TypeError` too: Python raises one for an unknown keyword argument, which a model option is.)"""


class ArgumentError(UsageError, ValueError):
  """A command-line or function argument that cannot work (a file name of an unknown format, a missing --name)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the command needs is not there (weights, checkpoint, config file)."""


class MissingDependencyError(UserError, ImportError):
  """An optional package the command needs is not installed (TensorFlow for the input pipeline, torch)."""


class BadFileError(UserError, ValueError):
  """A file that is there but is not what the command needs: another model's checkpoint, a weights file
  without the expected entries, an npz of another architecture."""


def find_user_error(exc: BaseException | None, *, deepest: bool = False,
                    through_context: bool = False) -> UserError | None:
  """The first (or, with `deepest`, the original) `UserError` in `exc`'s chain of explicit causes (`raise X
  from user_error`). `through_context` also follows implicit contexts (an exception raised while handling
  another): flag parsers re-raise what a config file raised that way, with the traceback in the message. A
  CLI's main does not follow them: a bug raised while handling a user error is a bug."""
  seen, found = set(), None
  while exc is not None and id(exc) not in seen:
    if isinstance(exc, UserError):
      found = exc
      if not deepest:
        return found
    seen.add(id(exc))
    exc = exc.__cause__ or (exc.__context__ if through_context else None)
  return found


def debug() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False")


def report(err: UserError, prog: str | None = None) -> int:
  """Prints `error: <message>` on stderr (with the program name when given); returns the exit code."""
  prefix = f"{prog}: error: " if prog else "error: "
  print(f"{prefix}{err}", file=sys.stderr, flush=True)
  return err.exit_code


def exit_on_user_error(fn=None, *, prog: str | None = None):
  """Decorator for a CLI's main: a `UserError` (or one it was raised from) becomes its message on stderr
  and `sys.exit(exit_code)`; with VIT_JAX_FIX_DEBUG=1 it is re-raised with its traceback."""
  if fn is None:
    return functools.partial(exit_on_user_error, prog=prog)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 (re-raised unless it is a user error)
      err = find_user_error(e)
      if err is None or debug():
        raise
      sys.exit(report(err, prog))
  return wrapper
