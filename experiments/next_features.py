"""What the first MTP module would gain from the trunk's own processing of the token it reads.

The first sequential module drafts t_{i+2} from the trunk's features at position i (its last
hidden state, and the outputs of the blocks mtp.feature_layers names) and the embedding of
t_{i+1}. Here it is trained to read one of those blocks, B, at position i + 1 instead: the
trunk's view of t_{i+1} itself after blocks 0..B. In decoding that would mean running those
B + 1 blocks of the trunk on t_{i+1} before each draft; this script decodes nothing, it measures
the agreement that cost would buy. The last position of a training window keeps its own block-B
output (1 in train.seq_len positions; the positions scored all have a next one).

For 'none' (the config's module as it is) and each block of --blocks: one training of the config
in ROOT/next_B (the feature cache made once under data.cache_dir, ROOT/cache when the config
leaves it empty, and shared), then head_agreement.py's count of the first module's top draft
token against the trunk's (--config.mtp.depth=1 trains that module alone): on the trunk's greedy
answers to the held-out prompts (the text decoding drafts on) and, with --cache, on that cache's
held-out answers. A run already trained is scored again, not retrained; a training stopped by a
signal stops the script.

Run: python experiments/next_features.py --config configs/smollm2_heads.py \
       --config.mtp.depth=1 --config.train.steps=400 --config.train.warmup_steps=40 \
       --config.train.checkpoint_every=400 --config.train.eval_every=400 \
       --config.decode.eval_prompts=0 --blocks none,2,15,27 --root runs/next_features \
       [--cache runs/cache/features/HASH] [--json FILE]
"""

import contextlib
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import head_agreement  # noqa: E402  (beside this script: its path when run, conftest's in tests)
from mtp_jax import atomic, cli  # noqa: E402


def define_flags():
  """The command line's flags, defined only when run as a script (tests import this module
  beside other scripts that define flags of the same names)."""
  global _CONFIG, _BLOCKS, _ROOT, _CACHE, _JSON
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/smollm2_heads.py',
                                            'Path to a config file.', lock_config=True)
  _BLOCKS = flags.DEFINE_list('blocks', ['none', '2', '15', '27'], 'Blocks of '
                              'mtp.feature_layers the first module reads at the next position, '
                              'one run each; none: the module as the config has it.')
  _ROOT = flags.DEFINE_string('root', 'runs/next_features', 'Folder of the runs, ROOT/next_B.')
  _CACHE = flags.DEFINE_string('cache', '', 'A feature cache directory: also count its held-out '
                               'answers (as head_agreement.py --cache).')
  _JSON = flags.DEFINE_string('json', '', 'Write every number to this JSON file.')


@contextlib.contextmanager
def reading_next(feature_layers: tuple, block: int | None):
  """Within it, MTPLanguageModel's heads read block `block`'s output (one of `feature_layers`,
  the slices of the trunk's features after its last hidden state) at position i + 1 in place of
  i; the trunk's own features (head_states' first entry) stay as they are. None: no change."""
  if block is None:
    yield
    return
  import jax.numpy as jnp
  from mtp_jax.model import MTPLanguageModel
  original = MTPLanguageModel.head_states
  j = feature_layers.index(block) + 1

  def head_states(self, h0_BxTxF, tokens_BxW, segments_BxT=None):
    D = self.cfg.d_model
    part = h0_BxTxF[:, :, j * D:(j + 1) * D]
    part = jnp.concatenate([part[:, 1:], part[:, -1:]], axis=1)  # the last keeps its own
    shifted = jnp.concatenate([h0_BxTxF[:, :, :j * D], part, h0_BxTxF[:, :, (j + 1) * D:]], -1)
    return [h0_BxTxF] + original(self, shifted, tokens_BxW, segments_BxT)[1:]

  MTPLanguageModel.head_states = head_states
  try:
    yield
  finally:
    MTPLanguageModel.head_states = original


def parse_blocks(values: list[str], feature_layers: tuple) -> list[int | None]:
  """--blocks as block indices (None for 'none'), each one of mtp.feature_layers, each once."""
  from mtp_jax.config import ConfigError
  blocks = []
  for v in values:
    block = None if v == 'none' else int(v) if v.isascii() and v.isdigit() else -1
    if block is not None and block not in feature_layers:
      raise ConfigError(f"--blocks takes 'none' and blocks of mtp.feature_layers "
                        f"({','.join(map(str, feature_layers)) or 'none set'}), got {v!r}")
    if block in blocks:
      raise ConfigError(f'--blocks names {v} twice')
    blocks.append(block)
  if not blocks:
    raise ConfigError('--blocks: give at least one')
  return blocks


def score(config, workdir: str, cache: str) -> dict:
  """head_agreement.py's counts of the first module in `workdir`: {data: agreement}."""
  from mtp_jax import inference, train
  session = train.Session(config, workdir, data=False, reads='bench')
  try:
    _, params = inference.load_params(session)
    draft_ids = head_agreement.draft_ids(session)
    prompts = inference.held_out_prompts(session, config.decode.bench_prompts)
    sums, _ = head_agreement.greedy_agreement(session, params, prompts, draft_ids)
    rows = {'held-out prompts': sums.get(('answer', 1), (0, 0))}
    if cache:
      found = head_agreement.cache_agreement(session, params, cache, draft_ids)
      rows["cache's held-out answers"] = found.get(('answer', 1), (0, 0))
  finally:
    session.checkpointer.close()
  return {name: agree / max(count, 1) for name, (agree, count) in rows.items()}


def main(argv):
  cli.start(argv)
  cli.output_file(_JSON.value, '--json')
  from mtp_jax import measure, run
  from mtp_jax.config import ConfigError, folder_problem, parse_layers
  from mtp_jax.pretrained.resolve import resolve_config
  try:
    config = resolve_config(_CONFIG.value)
    layers = parse_layers(config.mtp.feature_layers)
    if config.mtp.depth < 1 or config.mtp.kind != 'sequential' or not layers:
      raise ConfigError('the first module must be a sequential one reading mtp.feature_layers '
                        f'(mtp.depth={config.mtp.depth}, mtp.kind={config.mtp.kind}, '
                        f"mtp.feature_layers='{config.mtp.feature_layers}')")
    blocks = parse_blocks(_BLOCKS.value, layers)
    if blocks != [None] and (config.decode.eval_prompts or config.run_after_train):
      raise ConfigError('the decoder reads every block at i: a run whose module reads one at i + 1 '
                        'cannot decode, so set decode.eval_prompts=0 and run_after_train=\'\' '
                        f'(got {config.decode.eval_prompts} and {config.run_after_train!r})')
    problem = folder_problem(_ROOT.value, '--root')
    if problem:
      raise ConfigError(problem)
    if _CACHE.value:
      head_agreement.check_cache(_CACHE.value, layers)
  except (*run.USER_ERRORS, ValueError) as e:
    cli.fail(e)
  if not config.data.cache_dir:  # one cache for every run, not one in each workdir
    config.data.cache_dir = os.path.join(_ROOT.value, 'cache')
  result = {'machine': measure.machine(), 'feature_layers': list(layers), 'runs': []}
  for block in blocks:
    name = 'none' if block is None else str(block)
    workdir = os.path.join(_ROOT.value, f'next_{name}')
    with reading_next(layers, block):
      try:
        summary = run.run('train', config, workdir)
        if summary['stopped_by']:
          cli.fail(f'{workdir}: training stopped by {summary["stopped_by"]} at step '
                   f'{summary["step"]}; run the same command to go on')
        found = score(config, workdir, _CACHE.value)
      except run.USER_ERRORS as e:
        cli.fail(e)
    agree = (summary.get('eval') or {}).get('agreement/depth_1')
    result['runs'].append({'block': block, 'workdir': workdir, 'agreement': found,
                           'train_agree_at_1': agree})
    print(f'next_{name}: {found} (training\'s agree@1 {agree})', flush=True)
  print(f"\nmachine: {result['machine']}")
  names = list(result['runs'][0]['agreement'])
  print('| the first module reads | trunk blocks a draft would run | '
        + ' | '.join(f'agreement, {n}' for n in names) + " | training's agree@1 |")
  print('|---|---|' + '---|' * (len(names) + 1))
  for row in result['runs']:
    b = row['block']
    reads = (f"blocks {','.join(map(str, layers))} at i" if b is None else
             f'block {b} at i + 1, the others at i')
    agree = row['train_agree_at_1']
    print(f"| {reads} | {0 if b is None else b + 1} | "
          + ' | '.join(f"{row['agreement'][n]:.3f}" for n in names)
          + f" | {'-' if agree is None else f'{agree:.3f}'} |")
  if _JSON.value:
    atomic.write_json(_JSON.value, result, indent=2)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
