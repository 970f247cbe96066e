"""tau and speed against the size N of the draft vocabulary (the heads project onto the N most
frequent tokens of their training data; verification keeps the trunk's full distribution, so
every greedy output stays the `ar` output) and the dtype drafting reads the heads in
(decode.draft_dtype), in one run with every setting timed in interleaved rounds.

Run: python experiments/draft_vocab.py --config configs/smollm2.py --workdir runs/smollm2
     python experiments/draft_vocab.py ... --sizes 8192 --dtypes bfloat16,int8 --draft_len 2
Prints one row per N in --sizes ('full' is every token) and dtype in --dtypes: tau, acceptance
per position, tokens/s at batch 1 on held-out prompts (greedy, S = --draft_len or D, each prompt
decoded alone), ms per iteration, the speedup over `ar` and whether every output equals `ar`'s;
--json FILE keeps them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtp_jax import atomic, cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/smollm2.py', 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/smollm2', 'Run directory (its checkpoint, if any).')
_SIZES = flags.DEFINE_list('sizes', ['full', '16384', '8192', '4096'], 'Draft vocabulary sizes.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'decode.draft_dtype values (float32, '
                            'bfloat16, int8, q4_1).')
_DRAFT_LEN = flags.DEFINE_integer('draft_len', 0, 'S (0: every head, D).', lower_bound=0)
_ROUNDS = cli.rounds_flag(2)
_JSON = flags.DEFINE_string('json', '', 'Write the rows to this JSON file.')


def main(argv):
  cli.start(argv)
  cli.output_file(_JSON.value, '--json')
  from mtp_jax.config import DRAFT_DTYPES
  if not _SIZES.value or not all(n == 'full' or (n.isascii() and n.isdigit() and int(n) > 0)
                                 for n in _SIZES.value):
    cli.fail(f"--sizes takes 'full' or positive integers, got {','.join(_SIZES.value)}")
  if not _DTYPES.value or set(_DTYPES.value) - set(DRAFT_DTYPES):
    cli.fail(f"--dtypes takes some of {', '.join(DRAFT_DTYPES)}, got {','.join(_DTYPES.value)}")
  from mtp_jax import decode as dec
  from mtp_jax import inference
  from mtp_jax import measure
  from mtp_jax import run, train
  from mtp_jax.config import ConfigError
  config = _CONFIG.value
  try:
    session = train.Session(config, _WORKDIR.value, data=False, reads='bench')
    sizes = [None if n == 'full' else int(n) for n in _SIZES.value]
    largest = max(n or 0 for n in sizes)  # the flags against the model, before its params
    if largest > session.cfg.vocab_size:
      raise ConfigError(f'--sizes: the model has {session.cfg.vocab_size} tokens, fewer than '
                        f'{largest}')
    if _DRAFT_LEN.value > session.cfg.mtp_depth:
      raise ConfigError(f'--draft_len={_DRAFT_LEN.value}: the model has '
                        f'{session.cfg.mtp_depth} heads')
    _, params = inference.load_params(session)
    rank = session.token_rank()
    if rank is None and any(sizes):
      raise ConfigError('no token frequencies for this model (train here, or use heads that '
                        'carry them)')
    prompts = inference.held_out_prompts(session, config.decode.bench_prompts)
  except (*run.USER_ERRORS, ValueError) as e:  # a missing checkpoint too
    cli.fail(e)
  D, cfg = session.cfg.mtp_depth, session.cfg
  s_ar = inference.settings(session.config, draft=0, temperature=0.0, stop_ids=session.stop_ids)
  S = _DRAFT_LEN.value or D
  s_mtp = inference.settings(session.config, draft=S, temperature=0.0, stop_ids=session.stop_ids)
  ar_model = dec.decode_model(cfg, config.decode.kernels, use_tiles=config.decode.tiles)
  grid = [(n, t) for n in sizes for t in _DTYPES.value]
  models = [dec.decode_model(cfg, config.decode.kernels, None if n is None else rank[:n], t,
                             config.decode.tiles) for n, t in grid]
  rows = cli.batch1_sweep(params, prompts, [(ar_model, s_ar)] + [(m, s_mtp) for m in models],
                          _ROUNDS.value, 'draft_vocab: decoding')
  rows[0]['draft_vocab'], rows[0]['draft_dtype'] = 'ar', '-'
  for row, (n, _), m in zip(rows[1:], grid, models):
    row['draft_vocab'], row['draft_dtype'] = ('full' if n is None else n), m.draft_dtype
  print(f'machine: {measure.machine()}')
  print(f'{len(prompts)} held-out prompts, batch 1, greedy, S = {S}, up to '
        f'{s_mtp.max_new_tokens} new tokens, kernels {ar_model.kernels}')
  print(f"{'N':>6} {'dtype':>8} {'tau':>5} {'tokens/s':>9} {'ms/iter':>7} {'speedup':>7} "
        f"{'identical':>9}  acceptance")
  for r in rows:
    print(f"{r['draft_vocab']:>6} {r['draft_dtype']:>8} {r['tau']:>5.2f} "
          f"{r['tokens_per_s']:>9.1f} {r['ms_per_iteration']:>7.2f} {r['speedup']:>7.2f} "
          f"{'-' if r['draft_vocab'] == 'ar' else str(r['identical_to_ar']):>9}  "
          f"{r['acceptance'] or ''}")
  if _JSON.value:  # a crash leaves the previous file whole
    atomic.write_json(_JSON.value, {'machine': measure.machine(), 'rows': rows}, indent=2)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
