"""What launch.py and every experiment share at the command line: stray arguments refused, absl's
INFO logs (Orbax's, gguf's) kept off the terminal, compiled programs kept for the next run, and
a user's mistake told as one `error:` line with exit code 2 (each caller checks its flags before
it compiles or writes anything). Importing this module does not import JAX (so --help and flag
errors stay quick)."""

import sys
from typing import NoReturn

from absl import logging


def fail(message) -> NoReturn:
  """The user's input is wrong: `error: message` as one line on stderr, exit code 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def start(argv, persist: bool = True) -> None:
  """What a command does first, its flags parsed: refuses positional arguments (absl leaves them
  in argv), quiets absl's INFO logs, and with `persist` keeps what it compiles for the next run
  (run.persist_compiled_programs: a rerun of a bench or an experiment compiles nothing)."""
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
  logging.set_verbosity(logging.WARNING)
  if persist:
    from mtp_jax import run
    run.persist_compiled_programs()


def positive_ints(values: list[str], flag: str) -> list[int]:
  """A list flag's values as positive integers (config.positive_ints), else its one error line."""
  from mtp_jax.config import ConfigError, positive_ints
  try:
    return positive_ints(values, flag)
  except ConfigError as e:
    fail(e)
