"""The one entry point: python launch.py --config configs/X.py --workdir DIR [--mode MODE].

Modes: train (default), eval, demo, generate, bench, export. Each hands the locked config to one
function of mtp_jax.run.
"""

import json
import os
import re

from absl import app, flags
from ml_collections import config_flags

from mtp_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/quickstart.py',
                                          'Path to a config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<config name>).')
_MODE = flags.DEFINE_list('mode', ['train'], 'train; eval the latest checkpoint; demo, generate or '
                          'bench decoding; export to Hugging Face layout. Several, comma-separated, '
                          'run in turn (e.g. demo,bench).')
_PROMPT = flags.DEFINE_string('prompt', '', 'Prompt text for demo and generate.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', '', "generate: one prompt a line ('ids: 1 2 3' "
                                   'for token ids).')
_EXPORT_DTYPE = flags.DEFINE_enum('export_dtype', 'float32', ['float32', 'float16'],
                                  'export: the dtype of the written tensors.')


def main(argv):
  cli.start(argv, persist=False)  # Orbax logs every save step at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      'runs', os.path.splitext(os.path.basename(config_flags.get_config_filename(
          flags.FLAGS['config'])))[0])
  cli.check_modes_and_workdir(_MODE.value, workdir)
  cli.check_prompt_flags(_MODE.value, _PROMPT.value, _PROMPT_FILE.value)
  _check_before_jax(config)
  from mtp_jax import run  # here, not above: --help, flag and field errors need no JAX
  run.persist_compiled_programs()
  try:
    for mode in _MODE.value:
      summary = run.run(mode, config, workdir, _PROMPT.value, _PROMPT_FILE.value,
                        _EXPORT_DTYPE.value)
      if summary is not None:
        print(json.dumps(summary, indent=2, default=float))
  except run.USER_ERRORS as e:
    cli.fail(e)


def _check_before_jax(config) -> None:
  """A config that names no model file is checked before JAX is imported (a few seconds), so
  its bad fields are reported at once; one with model.init_from is checked when its file has
  filled in the fields it defines, as is one that leaves those fields unset (that error too)."""
  from mtp_jax import config as config_lib
  from mtp_jax import pretrained
  if config.model.init_from or pretrained.unset_fields(config):
    return
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    cli.fail(e)


def _parse_or_exit(argv):
  """Parses flags once up front so a misspelled config key is one line, not a traceback."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a failed load surfaces lazily; touch the config to report it here
  except (OSError, SyntaxError, ImportError) as e:
    reason = str(e).strip().splitlines()[-1].strip()
    cli.fail(f'cannot load the config file: {reason}')
  except (AttributeError, KeyError) as e:
    bad = [a.split('=')[0] for a in argv if a.startswith('--config.')]
    detail = str(e).strip('\'"').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
    # ml_collections lists every field of the section; its suggestion, where it makes one, is
    # what the line needs
    detail = re.sub(r'\s*Other fields present: ".*?"(?=\s*Did you mean|$)', '', detail)
    given = f'; overrides given: {", ".join(bad)}' if bad else ' (in the config file)'
    cli.fail(f'the config has no such field ({detail}){given}')
  except flags.Error as e:
    # An exception inside the config file's get_config comes back with its whole traceback in
    # the message; its last line says what went wrong.
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    reason = f'{lines[0]} {lines[-1]}' if 'Error whilst parsing' in str(e) else str(e)
    cli.fail(f'{reason}')
  except Exception as e:  # anything else the config file's own code raises (a NameError, ...)
    cli.fail(f'cannot load the config file: {type(e).__name__}: {e}')
  return remaining


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_or_exit)
