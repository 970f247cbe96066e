"""tau and speed of decoding against the draft length S, the number K of first-draft candidates
(decode.candidates: K first drafts verified in one trunk forward, the chain of S - 1 more drafts
following the first head's argmax, or its draw when sampling, and its K - 1 most likely other
tokens beside it) and the drafts C in each alternative's branch (decode.candidate_depth), in one
run with every setting timed in interleaved rounds.

Run: python experiments/candidates.py --config configs/smollm2.py --workdir runs/smollm2 \
       [--draft_lens 2,3] [--candidates 1,3,6] [--depths 1,3] [--temperature 1]
Prints one row per (S, K, C): the positions (rows) one verify forward takes, tau, acceptance per
position, tokens/s at batch 1 on held-out prompts (each prompt decoded alone), ms per iteration
(tau / tokens/s: one verify forward, its drafts and bookkeeping), the speedup over `ar` (at the
same temperature) and, greedy, whether every output equals `ar`'s; --json FILE keeps them.
--tiles both (where scaled tiles run: on the tile unit, AMX, or on the FMAs of AVX-512 or
AVX2) times every row with and without tiles in the same rounds (decode.tiles), each against
`ar` without them;
--tiles forms (on a CPU with AMX) also with the trunk's matrices all in two bfloat16 halves
(kernels.tiled, 4 bytes an entry) where the config's decoder keeps those that have the form as
kernels.ScaledTiles (a GGUF file's Q4_1 tensors, half a byte an entry, and Q8_0's, 1).
The tiles column names each row's: none, halves or scaled.
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
_DRAFTS = flags.DEFINE_list('draft_lens', [], 'Draft lengths S (default: 1..mtp.depth).')
_CANDIDATES = flags.DEFINE_list('candidates', ['1', '2', '3', '4'], 'First-draft candidates K.')
_DEPTHS = flags.DEFINE_list('depths', ['1'], 'Drafts C per alternative\'s branch (C <= S; '
                            'with K > 1).')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sampling temperature (0: greedy); top_k '
                                   'and top_p come from the config.', lower_bound=0.0)
_ROUNDS = cli.rounds_flag(2)
_JSON = flags.DEFINE_string('json', '', 'Write the rows to this JSON file.')
_TILES = flags.DEFINE_enum('tiles', 'config', ['config', 'both', 'forms'], 'config: '
                           'decode.tiles; both: every setting also without tiles (where they '
                           'run), in the same interleaved rounds, the reference being `ar` '
                           'without them; forms: also with the trunk tiled in two halves only '
                           '(the tile unit alone).')


def main(argv):
  cli.start(argv)
  cli.output_file(_JSON.value, '--json')
  lens = cli.positive_ints(_DRAFTS.value, '--draft_lens', allow_empty=True)  # empty: 1..D
  counts = cli.positive_ints(_CANDIDATES.value, '--candidates')
  depths = cli.positive_ints(_DEPTHS.value, '--depths')
  import dataclasses
  from mtp_jax import decode as dec
  from mtp_jax import inference
  from mtp_jax import kernels
  from mtp_jax import measure
  from mtp_jax import run, train
  from mtp_jax.config import ConfigError, check_temperature
  config = _CONFIG.value
  try:
    D = config.mtp.depth
    lens = lens or list(range(1, D + 1))
    if D < 1 or max(lens + depths) > D:
      raise ConfigError(f'--draft_lens and --depths must be in 1..mtp.depth={D}')
    check_temperature(_TEMPERATURE.value, '--temperature', 'greedy')
    # its prompts are bench's
    session = train.Session(config, _WORKDIR.value, data=run.needs_data(config, 'bench'),
                            reads='bench')
    prompts = inference.held_out_prompts(session, config.decode.bench_prompts)
    T = _TEMPERATURE.value
    s_ar = inference.settings(session.config, draft=0, temperature=T, stop_ids=session.stop_ids)
    s_mtp = inference.settings(session.config, draft=1, temperature=T, stop_ids=session.stop_ids)
    # K = 1 has no branches: one row per S; K > 1 one per depth C up to S.
    settings = [s_ar] + [dataclasses.replace(s_mtp, draft_len=S, candidates=K, candidate_depth=C)
                         for S in lens for K in counts
                         for C in ([1] if K == 1 else [C for C in depths if C <= S])]
    drafts = config.decode.draft_vocab or session.cfg.vocab_size
    if max(counts) > drafts:
      raise ConfigError(f'--candidates {max(counts)}: the heads draft over {drafts} tokens')
    inference.check_batch1(session.cfg, prompts, settings)  # before the params are made
    if _TILES.value == 'forms' and not kernels.tiles_usable():
      raise ConfigError('--tiles forms times two bfloat16 halves, which only the tile unit (AMX) '
                        'multiplies; this CPU does not have it')
    _, params = inference.load_params(session)
  except (*run.USER_ERRORS, ValueError) as e:  # a missing checkpoint too
    cli.fail(e)
  models = [session.decode_model]
  tiled = session.decode_model.tiled_matrices(params)
  if _TILES.value != 'config' and tiled:
    models.insert(0, dataclasses.replace(session.decode_model, tiles=False))
    if _TILES.value == 'forms':
      models.insert(1, dataclasses.replace(session.decode_model, scaled_trunk=False))
  variants = [(m, s) for m in models for s in settings]
  rows = cli.batch1_sweep(params, prompts, variants, _ROUNDS.value, 'candidates: decoding',
                          same_as=[i - i % len(settings) for i in range(len(variants))])
  for row, (m, s) in zip(rows, variants):
    row.update(draft_len=s.draft_len, candidates=s.candidates,
               candidate_depth=s.branch_depth,
               positions=dec.verify_width(s),
               tiles=('scaled' if m.scaled_trunk else 'halves') if m.tiles and tiled else 'none')
  print(f'machine: {measure.machine()}')
  how = 'greedy' if T == 0 else f'temperature {T}, top_k {s_ar.top_k}, top_p {s_ar.top_p}'
  print(f'{len(prompts)} held-out prompts, batch 1, {how}, up to {s_ar.max_new_tokens} new '
        f'tokens, draft vocabulary {config.decode.draft_vocab or "all"}, kernels '
        f'{session.decode_model.kernels}, {tiled} matrices tiled'
        + (', and with other tile forms (speedups over ar without tiles; identical: to ar with '
           'the same)' if len(models) > 1 else ''))
  print(f"{'tiles':>6} {'S':>2} {'K':>2} {'C':>2} {'rows':>4} {'tau':>5} {'tokens/s':>9} "
        f"{'ms/iter':>7} {'speedup':>7} {'identical':>9}  acceptance")
  for r in rows:
    same = '-' if r['identical_to_ar'] is None else str(r['identical_to_ar'])
    print(f"{r['tiles']:>6} {r['draft_len']:>2} {r['candidates']:>2} "
          f"{r['candidate_depth']:>2} {r['positions']:>4} {r['tau']:>5.2f} {r['tokens_per_s']:>9.1f} "
          f"{r['ms_per_iteration']:>7.2f} {r['speedup']:>7.2f} {same:>9}  "
          f"{r['acceptance']}")
  if _JSON.value:  # a crash leaves the previous file whole
    atomic.write_json(_JSON.value, {'machine': measure.machine(), 'rows': rows}, indent=2)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
