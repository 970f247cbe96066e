"""The one entry point: python launch.py --config configs/X.py --workdir DIR [--mode MODE].

Modes: train (default), eval, demo, generate, bench, export. Each hands the locked config to one
function of mtp_jax.run.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mtp_jax import cli

try:  # the default file is loaded here, with the --config.FIELD overrides in argv
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/quickstart.py',
                                            'Path to a config file.', lock_config=True)
except Exception as e:
  cli.config_failed(e, sys.argv)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<config name>).')
_MODE = flags.DEFINE_list('mode', ['train'], 'train; eval the latest checkpoint; demo, generate or '
                          'bench decoding; export to Hugging Face layout. Several, comma-separated, '
                          'run in turn (e.g. demo,bench).')
_PROMPT = flags.DEFINE_string('prompt', '', "Prompt text for demo and generate ('ids: 1 2 3' for "
                              'token ids).')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', '', "generate: one prompt a line ('ids: 1 2 3' "
                                   'for token ids).')
_EXPORT_DTYPE = flags.DEFINE_enum('export_dtype', 'float32', ['float32', 'float16'],
                                  'export: the dtype of the written tensors.')


def main(argv):
  cli.start(argv, persist=False)  # Orbax logs every save step at INFO
  config = _CONFIG.value
  if _WORKDIR.value is not None and not _WORKDIR.value.strip():  # not the default's folder
    cli.fail('--workdir is empty: give a folder, or leave the flag out for runs/<config name>')
  workdir = _WORKDIR.value or os.path.join(
      'runs', os.path.splitext(os.path.basename(config_flags.get_config_filename(
          flags.FLAGS['config'])))[0])
  cli.check_modes_and_workdir(_MODE.value, workdir)
  cli.check_prompt_flags(_MODE.value, _PROMPT.value, _PROMPT_FILE.value)
  _check_before_jax(config)
  try:
    run_modes(config, workdir)
  except KeyboardInterrupt:  # a training stops at its next step and saves; the rest just ends
    print('stopped by Ctrl-C', file=sys.stderr)
    sys.exit(130)


def run_modes(config, workdir: str) -> None:
  from mtp_jax import run  # here, not above: --help, flag and field errors need no JAX
  run.persist_compiled_programs()
  try:
    run.check_modes(_MODE.value, config, workdir, _PROMPT.value, _PROMPT_FILE.value)
    for i, mode in enumerate(_MODE.value):
      summary = run.run(mode, config, workdir, _PROMPT.value, _PROMPT_FILE.value,
                        _EXPORT_DTYPE.value, then=tuple(_MODE.value[i + 1:]))
      if summary is not None:
        print(json.dumps(summary, indent=2, default=float))
      if mode == 'train' and summary['stopped_by']:  # preempted: the later modes wait too
        break
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


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
