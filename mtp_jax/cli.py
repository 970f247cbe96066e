"""What launch.py and every experiment share at the command line: stray arguments refused, absl's
INFO logs (Orbax's, gguf's) kept off the terminal, compiled programs kept for the next run, a
Ctrl-C never lost and told in one line, and a user's mistake told as one `error:` line with exit
code 2 (each caller checks its flags before
it compiles or writes anything). Importing this module does not import JAX (so --help and flag
errors stay quick)."""

import _thread
import os
import re
import signal
import sys
import threading
import time
from typing import NoReturn

from absl import logging


def fail(message) -> NoReturn:
  """The user's input is wrong: `error: message` as one line on stderr, exit code 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


MODES = ('train', 'eval', 'demo', 'generate', 'bench', 'export')  # launch.py's --mode
WRITING_MODES = ('train', 'bench', 'export')  # the others only read the workdir
DECODING_MODES = ('demo', 'generate', 'bench')


def check_modes_and_workdir(modes: list[str], workdir: str) -> None:
  """launch.py's --mode and --workdir, checked before JAX is imported: every mode one of MODES;
  the workdir not a file, and where a mode writes there, somewhere this user can create it."""
  bad = [m for m in modes if m not in MODES]
  if bad or not modes:
    fail(f"--mode: {bad[0] if bad else 'nothing'} is not one of {', '.join(MODES)}")
  from mtp_jax.config import folder_problem, write_problem
  # a mode that writes there also needs to make things there (write_problem makes a folder to
  # see); no mode can read or write where folder_problem says why not
  writes = any(mode in WRITING_MODES for mode in modes)
  problem = (write_problem if writes else folder_problem)(workdir, '--workdir')
  if problem:
    fail(problem)


def check_prompt_flags(modes: list[str], prompt: str, prompt_file: str) -> None:
  """--prompt is read by demo and generate, --prompt_file by generate: given to modes that do
  not read them (or both to generate alone, which reads the file) they would be ignored."""
  if prompt:  # absl hands on bytes that are not UTF-8 as lone surrogates
    try:
      prompt.encode('utf-8')
    except UnicodeEncodeError:
      fail('--prompt is not UTF-8 text')
  if prompt and not {'demo', 'generate'} & set(modes):
    fail(f'--prompt is read by --mode demo and generate, not by {",".join(modes)}')
  if prompt_file and 'generate' not in modes:
    fail(f'--prompt_file is read by --mode generate, not by {",".join(modes)}')
  if prompt and prompt_file and 'demo' not in modes:
    fail('give generate --prompt or --prompt_file, not both')
  if prompt_file:  # before the modes before generate run and write
    from mtp_jax.config import ConfigError, prompt_lines
    try:
      prompt_lines(prompt_file, '--prompt_file')
    except ConfigError as e:
      fail(e)


def flags_parser(config_flag=None):
  """absl's flags parser for launch.py and the experiments: parses once up front, so a flag's
  bad value (one out of its bounds, a word for a number), a misspelled config key or a config
  file that fails to load is one line and exit 2, not a traceback or absl's two lines."""
  from absl import flags
  from ml_collections import ConfigDict

  def parse(argv):
    logging.set_verbosity(logging.ERROR)  # ml_collections warns of a None config: said below
    try:
      remaining = flags.FLAGS(argv)
      if config_flag is not None:  # a failed load surfaces lazily; touch the config to report it
        config = config_flag.value
        if not isinstance(config, ConfigDict):  # one that failed to load raises its error here
          getattr(config, 'model', None)
        if not (isinstance(config, ConfigDict) and 'model' in config and 'data' in config):
          fail(NOT_A_CONFIG)
    except Exception as e:
      config_failed(e, argv)
    return remaining
  return parse


NOT_A_CONFIG = ("the config file's get_config() must return an ml_collections ConfigDict with the "
                'sections of configs/base.py (model, data, ...); start from base.get_config()')


def gives_no_config_dict(argv: list[str]) -> bool:
  """Whether the --config file in argv loads and its get_config() returns something other than a
  ConfigDict (a plain dict, say), whose overrides ml_collections reports as a missing field."""
  import runpy
  from ml_collections import ConfigDict
  paths = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  paths += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == '--config']
  if not paths:
    return False
  try:
    return not isinstance(runpy.run_path(paths[-1].split(':')[0])['get_config'](), ConfigDict)
  except Exception:  # a file that does not load is reported by the caller's own lines
    return False


def config_failed(e: Exception, argv: list[str]) -> NoReturn:
  """The one line for a config that could not be loaded or overridden: while the flags are
  parsed, or where the config flag's default file is loaded, when it is defined (the overrides
  in argv are applied to it there)."""
  from absl import flags
  if isinstance(e, (OSError, SyntaxError, ImportError)):
    fail(f'cannot load the config file: {str(e).strip().splitlines()[-1].strip()}')
  if isinstance(e, flags.Error) and 'Unexpected None value for flag config' in str(e):
    fail("the config file's get_config() returned None (no return statement?)")
  if isinstance(e, AttributeError) and "attribute 'get_config'" in str(e):
    fail('cannot load the config file: it defines no get_config()')
  if isinstance(e, (AttributeError, KeyError)):
    if gives_no_config_dict(argv):
      fail(NOT_A_CONFIG)
    bad = [a.split('=')[0] for a in argv if a.startswith('--config.')]
    detail = str(e).strip('\'"').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
    # ml_collections lists every field of the section; its suggestion, where it makes one, is
    # what the line needs
    detail = re.sub(r'\s*Other fields present: ".*?"(?=\s*Did you mean|$)', '', detail)
    given = f'; overrides given: {", ".join(bad)}' if bad else ' (in the config file)'
    fail(f'the config has no such field ({detail}){given}')
  if isinstance(e, flags.Error):
    # An exception inside the config file's get_config comes back with its whole traceback in
    # the message; its last line says what went wrong.
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    fail(f'{lines[0]} {lines[-1]}' if 'Error whilst parsing' in str(e) else str(e))
  # anything else the config file's own code raises (a NameError, ...)
  fail(f'cannot load the config file: {type(e).__name__}: {e}')


def start(argv, persist: bool = True) -> None:
  """What a command does first, its flags parsed: refuses positional arguments (absl leaves them
  in argv), quiets absl's INFO logs, and with `persist` keeps what it compiles for the next run
  (run.persist_compiled_programs: a rerun of a bench or an experiment compiles nothing), makes
  sure a Ctrl-C is not lost (_keep_ctrl_c), and has one that ends the command say so in one line
  instead of a traceback through JAX (the process still ends as Ctrl-C ends it: exit code 130 in
  a shell)."""
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
  logging.set_verbosity(logging.WARNING)
  sys.unraisablehook = _keep_ctrl_c
  sys.excepthook = _ctrl_c_in_one_line
  if persist:
    from mtp_jax import run
    run.persist_compiled_programs()


def _keep_ctrl_c(unraisable) -> None:
  """Python raises Ctrl-C's KeyboardInterrupt in whatever code the main thread runs, and where that
  is a callback whose exceptions Python only prints (JAX's garbage-collection hook, which runs
  often while a program compiles; a __del__), it was printed as 'Exception ignored' and lost: the
  command ran on. Such a KeyboardInterrupt is delivered again to the main thread, where it stops
  the command as any other Ctrl-C does; other exceptions are printed as before. Another thread
  delivers it a moment later, once this hook has returned (one delivered here would be raised in
  the hook itself, and printed); should it land in such a callback again, it comes back here.
  Once the command is ending (Python waits for its threads, runs its exit callbacks, shuts
  down), there is nothing left to stop: a Ctrl-C then is printed as before, and ends only the
  one callback it landed in."""
  if (issubclass(unraisable.exc_type, KeyboardInterrupt)
      and callable(signal.getsignal(signal.SIGINT)) and not _ending(unraisable)):
    try:
      _thread.start_new_thread(_interrupt_main_soon, ())
      return
    except RuntimeError:  # no new thread could be started
      pass
  sys.__unraisablehook__(unraisable)


def _ending(unraisable) -> bool:
  """Whether Python reports this exception from its own exit: waiting for the threads (it names
  the threading module), an exit callback, or the shutdown."""
  return (sys.is_finalizing() or unraisable.object is sys.modules.get('threading')
          or 'atexit' in (unraisable.err_msg or ''))


def _ctrl_c_in_one_line(kind, value, traceback) -> None:
  if issubclass(kind, KeyboardInterrupt):
    print('stopped by Ctrl-C', file=sys.stderr)
  else:
    sys.__excepthook__(kind, value, traceback)


def _interrupt_main_soon() -> None:
  """SIGINT to the main thread, as a terminal sends it (a wait or sleep there ends at once)."""
  time.sleep(0.01)
  signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def weights_source(workdir: str, random: bool) -> None:
  """A decoding script's weights: a workdir's (or a pretrained model's) or --random, one of the
  two (random weights would leave a given workdir unread)."""
  if not workdir and not random:
    fail('give --workdir (a trained run, or any directory for a pretrained model) or --random')
  if workdir and random:
    fail('--random decodes random weights and reads no --workdir: give one of the two')


def output_file(path: str, flag: str) -> None:
  """A script's output file flag, checked before any work (the file itself is written at the end,
  whole or not at all: atomic.write_json): not a folder, and in a folder that can be made."""
  if not path:
    return
  from mtp_jax.config import write_problem
  if os.path.isdir(path):
    fail(f'{flag} {path} is a directory; give a file to write')
  problem = write_problem(os.path.dirname(os.path.abspath(path)), flag)
  if problem:
    fail(problem)


def batch1_sweep(*args, **kwargs) -> list[dict]:
  """inference.batch1_sweep for a script: prompts a variant cannot decode (a cache past
  model.max_seq_len, say) are one line, before anything compiles."""
  from mtp_jax import inference
  return _one_line(inference.batch1_sweep, *args, **kwargs)


def batch1_checked(*args, **kwargs) -> None:
  """inference.check_batch1 for a script whose decoding comes after other compiled work or after
  its params are made: the same line, before any of it (batched loops pad their prompts to the
  longest too, so it holds for them)."""
  from mtp_jax import inference
  _one_line(inference.check_batch1, *args, **kwargs)


def check_bytes(*args, **kwargs) -> None:
  """sharding.check_bytes for a script: sizes its flags set past memory are one line."""
  from mtp_jax import sharding
  _one_line(sharding.check_bytes, *args, **kwargs)


def _one_line(fn, *args, **kwargs):
  from mtp_jax.config import ConfigError
  try:
    return fn(*args, **kwargs)
  except ConfigError as e:
    fail(e)


def rounds_flag(default: int):
  """The --rounds flag of a script that times things: interleaved rounds, the fastest kept."""
  from absl import flags
  return flags.DEFINE_integer('rounds', default, 'Interleaved timing rounds; the fastest is kept.',
                              lower_bound=1)


def require_peers(*modules: str) -> None:
  """The peer packages a comparison script imports, installed in its own environment (never in
  CI's): one line naming the first one missing."""
  import importlib.util
  for name in modules:
    if importlib.util.find_spec(name) is None:
      fail(f'{name} is not installed in this Python ({sys.executable}): the peer comparisons run '
           'in their own environment: python3 -m venv .venv-peers && .venv-peers/bin/pip '
           'install -r requirements.txt -r requirements-peers.txt')


def positive_ints(values: list[str], flag: str, allow_empty: bool = False) -> list[int]:
  """A list flag's values as positive integers (config.positive_ints), else its one error line."""
  from mtp_jax.config import ConfigError, positive_ints
  try:
    return positive_ints(values, flag, allow_empty)
  except ConfigError as e:
    fail(e)
