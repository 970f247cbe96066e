"""Decoding on a trained checkpoint: the demo, text generation, the ar-vs-mtp benchmark, and the
speculative-decoding check that runs during training's evaluations.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mtp_jax import atomic
from mtp_jax import checkpoint as ckpt_lib
from mtp_jax import data as data_lib
from mtp_jax import decode as dec
from mtp_jax import measure
from mtp_jax.config import ConfigError, check_mtp_decoding, draft_len, prompt_lines
from mtp_jax.pretrained.tokenizer import chat_turn


def settings(config, *, stop_ids: tuple[int, ...], draft=None, temperature=None) -> dec.Settings:
  """Settings from config.decode; draft (S) defaults to the config's (0 for decode.method=ar).
  `ar` verifies no alternatives (decode.candidates is set to 1). A branch holds at most S
  drafts (decode.candidate_depth is cut to S)."""
  d = config.decode
  S = draft_len(config) if draft is None else draft
  if S > config.mtp.depth:
    raise ConfigError(f'a draft of {S} tokens needs as many heads; the model has '
                      f'mtp.depth={config.mtp.depth}')
  T = d.temperature if temperature is None else temperature
  K = d.candidates if S > 0 else 1
  # Without alternatives there are no branches: one Settings (and compilation) for the chain.
  return dec.Settings(draft_len=S, max_new_tokens=d.max_new_tokens, temperature=T, top_k=d.top_k,
                      top_p=d.top_p, stop_ids=stop_ids, candidates=K,
                      candidate_depth=min(d.candidate_depth, S) if K > 1 else 1)


def check_prompts(prompts: list[list[int]], vocab_size: int, s: dec.Settings, max_len: int,
                  width: int = 0, new_tokens: str = ''):
  """One-line errors for prompts the decoder cannot take, before anything compiles (`width`:
  the length they are padded to, when more than their own; `new_tokens`: what sets the tokens
  written, when not decode.max_new_tokens)."""
  for i, p in enumerate(prompts):
    if not p:
      raise ConfigError(f'prompt {i + 1} is empty')
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
      raise ConfigError(f'prompt {i + 1} has token ids outside the vocabulary 0..{vocab_size - 1}: '
                        f'{bad[:5]}')
  longest = max([width] + [len(p) for p in prompts])
  need = dec.cache_length(longest, s)
  if need > max_len:
    new_tokens = new_tokens or f'decode.max_new_tokens={s.max_new_tokens}'
    raise ConfigError(
        f'prompt of {longest} tokens + {new_tokens} + a verify block of {dec.verify_width(s)} '
        f'position{"s" * (dec.verify_width(s) > 1)} needs a cache of {need}, more than '
        f'model.max_seq_len={max_len}')


def prepared_decoder(model: dec.DecodeModel, params, prompts: list[list[int]], s: dec.Settings,
                     key=0, batch: int | None = None, width: int = 0):
  """Checks the prompts against the model config, compiles the decoder for them (rows at once:
  `batch`, the rest queued; all by default; prompts padded to `width` at least, so that calls
  on different prompts share one compilation) and returns call() -> final state."""
  cfg = model.cfg
  check_prompts(prompts, cfg.vocab_size, s, cfg.max_seq_len, width)
  prompts_QxP, lens = dec.pad_prompts(prompts, width)
  decoder = dec.compiled_decoder(model, s, dec.cache_length(prompts_QxP.shape[1], s), batch)
  return decoder.compiled(params, prompts_QxP, lens, jax.random.key(key))


def decode(session, params, prompts: list[list[int]], s: dec.Settings, key=0):
  """Decodes a batch of prompts; returns (final state, seconds excluding compilation)."""
  call = prepared_decoder(session.decode_model, params, prompts, s, key)
  (seconds,), (state,) = measure.fastest([call], 1)
  return state, seconds


def validation_prompts(session, count: int, length: int) -> list[list[int]]:
  """`count` windows of `length` tokens, evenly spaced over the validation split."""
  valid = session.data.valid
  if len(valid) <= length:  # else windows cut short, or empty, would be decoded as prompts
    raise ConfigError(f'decode.prompt_len={length}: the validation split holds {len(valid)} '
                      'tokens, too few for a prompt of that length; lower decode.prompt_len or '
                      'raise data.valid_fraction, or give decode.prompts')
  starts = np.linspace(0, len(valid) - length - 1, count).astype(int)
  return [valid[s:s + length].astype(int).tolist() for s in starts]


def encode_prompt(session, text: str, chat: bool) -> list[int]:
  """A text prompt's ids: as a user turn of the model's chat template when `chat` and the model
  has one (its special tokens each one id), else the text as it is. Before a model trained here
  has its tokenizer (a check made before its data), one id stands in: no prompt has fewer."""
  if session.stand_ins:
    return [0]
  if chat and session.chat_template:
    text = chat_turn(session, text)
    return session.tokenizer.encode(text, add_special_tokens=False).ids
  return data_lib.encode(session.tokenizer, text)


def prompt_ids(session, line: str, chat: bool, name: str) -> list[int]:
  """A prompt as every prompt flag and file takes it: 'ids: 1 2 3' gives raw token ids, other
  text is encoded (encode_prompt); `name` is the flag or field the line came from."""
  if not line.startswith('ids:'):
    return encode_prompt(session, line, chat)
  try:
    return [int(t) for t in line[4:].split()]
  except ValueError:
    raise ConfigError(f'{name}: bad token ids line {line!r}') from None


def held_out_prompts(session, count: int) -> list[list[int]]:
  """Prompts for bench and the training-time decode check: the first `count` lines of
  decode.prompts (cycled if there are fewer), else windows of the validation split."""
  d = session.config.decode
  if not d.prompts:
    return validation_prompts(session, count, d.prompt_len)
  lines = prompt_lines(d.prompts, 'decode.prompts')
  return [prompt_ids(session, lines[i % len(lines)], d.chat, 'decode.prompts')
          for i in range(count)]


def load_params(session):
  """(step, params) of the latest checkpoint; with no checkpoint, a pretrained model's initial
  params (step 0)."""
  step, state, _ = session.checkpointer.restore_latest_valid(session.abstract_state,
                                                                set_aside=False)
  if state is not None:
    return step, state['params']
  if session.config.model.init_from:
    return 0, session.initial_params()
  raise ckpt_lib.CheckpointError(f'no checkpoint in {session.workdir}; train first')


@dataclasses.dataclass
class DecodeInputs:
  """What the decoding experiments time (experiments/decode_profile.py, bench_sampling.py).
  `params`, and `source` (which weights, for the printout), are made or read when first asked
  for (random weights are compiled, and so are the random parts of a pretrained model's params),
  so that a script checks its flags against the rest first."""
  config: object  # resolved: a pretrained model's fields filled in from its file
  cfg: object  # ModelConfig
  load: object  # () -> (source, params)
  model: dec.DecodeModel
  prompts: list
  mesh: object
  session: object  # train.Session, or None for random weights

  @functools.cached_property
  def _loaded(self) -> tuple:
    return self.load()

  @property
  def params(self) -> dict:
    return self._loaded[1]

  @property
  def source(self) -> str:
    return self._loaded[0]


def decode_inputs(config, workdir: str, count: int, random: bool, rows: int = 1,
                  rows_flag: str = '') -> DecodeInputs:
  """With `random`, random weights and `count` random prompts of decode.prompt_len tokens
  (per-call costs do not depend on the weights; a draft vocabulary of decode.draft_vocab tokens is
  the first ids, its cost that of any N); else the checkpoint in `workdir` (or the
  pretrained model, for which any directory does) and `count` held-out prompts. `rows`: the most
  the caller decodes at once (set by its `rows_flag`), whose caches must fit memory (checked
  before the prompts are made)."""
  from mtp_jax import sharding
  from mtp_jax import train as train_lib
  from mtp_jax.config import ModelConfig, validate
  from mtp_jax.model import init_params
  from mtp_jax.pretrained.resolve import resolve_config
  config = resolve_config(config)
  d = config.decode
  if random:  # the checks a Session makes for a decoding mode
    validate(config)
    train_lib.check_fits(config, 'profile')
    cfg = ModelConfig.from_config(config)
    ids = range(d.draft_vocab) if d.draft_vocab else None
    model = dec.decode_model(cfg, d.kernels, ids, d.draft_dtype, d.tiles)
    _check_rows(model, d, rows, rows_flag)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (count, d.prompt_len))
    return DecodeInputs(config, cfg,
                        lambda: ('random weights', init_params(cfg, jax.random.key(config.seed))),
                        model, prompts.tolist(), sharding.make_mesh(config.mesh), None)
  session = train_lib.Session(config, workdir, data=not (config.model.init_from and d.prompts),
                              reads='profile')  # no checkpoint: said before anything is written
  _check_rows(session.decode_model, d, rows, rows_flag)
  prompts = held_out_prompts(session, count) if count else []

  def load():
    step, params = load_params(session)
    return f'{workdir} step {step}', params
  return DecodeInputs(config, session.cfg, load, session.decode_model, prompts, session.mesh,
                      session)


def _check_rows(model, d, rows: int, flag: str) -> None:
  """`rows` rows' KV caches (the decode model's), each at least as long as one token's prompt and
  the decode.* tokens after it at the deepest draft, fit memory."""
  from mtp_jax import sharding
  length = dec.cache_length(1, dec.Settings(draft_len=model.cfg.mtp_depth,
                                            max_new_tokens=d.max_new_tokens))
  sharding.check_bytes(model.cache_bytes(rows, length), f'decoding {rows:,} rows at once needs',
                       f'their KV caches of {length} slots', flag)


def _text(session, ids) -> str:
  return data_lib.decode(session.tokenizer, ids)


def _top5(session, logits_N, token_ids=None) -> str:
  """The five most likely tokens (of token_ids[i] for logit i, when given) and their
  probabilities."""
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits_N, jnp.float32)))
  top = np.argsort(-probs)[:5]
  ids = top if token_ids is None else np.asarray(token_ids)[top]
  return '  '.join(f'{_text(session, [t])!r} {probs[i]:.2f}' for t, i in zip(ids, top))


def _demo_settings(session) -> dec.Settings:
  """One draft-and-verify iteration of every head: D + 1 new tokens at most."""
  D = session.cfg.mtp_depth
  return dec.Settings(draft_len=D, max_new_tokens=D + 1, stop_ids=session.stop_ids)


def check_demo(session, prompt: str) -> list[int]:
  """demo's one-line errors, before it compiles (and, run after training, before the first step);
  returns the prompt's ids."""
  if session.cfg.mtp_depth < 1:
    raise ConfigError('demo shows MTP heads\' drafts, but mtp.depth=0 (leave demo out of '
                      '--mode and run_after_train)')
  ids = prompt_ids(session, prompt, session.config.decode.chat, 'the demo prompt')
  s = _demo_settings(session)
  check_prompts([ids], session.cfg.vocab_size, s, session.cfg.max_seq_len,
                new_tokens=f"demo's {s.max_new_tokens} new tokens")
  return ids


def demo_step(session, params, ids: list[int]) -> dict:
  """Prefill and exactly one draft-and-verify iteration on one prompt (compiled, then timed): the
  trunk's and every depth's logits at the prompt's end, the drafts, and what was committed."""
  model = session.decode_model
  s = _demo_settings(session)
  prompts_1xP, lens = dec.pad_prompts([ids])
  cache_len = dec.cache_length(len(ids), s)

  def one_step(prepared, prompts, lens):
    first, trunk_logits = dec.prefill(model, prepared, prompts, lens, jax.random.key(0), s,
                                      cache_len)
    after, info = dec.step(model, prepared, first, s)
    drafts_index = model.argmax(info['draft_logits'])
    return {'trunk_logits': trunk_logits[0], 'draft_logits': info['draft_logits'][0],
            'draft_index': drafts_index[0], 'drafts': info['drafts'][0],
            'first': first.rows.tokens[0, len(ids)], 'accepted': info['accepted'][0],
            'committed': after.rows.tokens[0, len(ids) + 1:len(ids) + 1 + s.max_new_tokens],
            'count': info['count'][0]}
  args = (model.prepare(params), prompts_1xP, lens)
  call = functools.partial(jax.jit(one_step).lower(*args).compile(), *args)
  (seconds,), (out,) = measure.fastest([call], 1)
  out = jax.device_get(out)
  out['draft_tokens'] = np.asarray(jax.device_get(model.draft_tokens(
      args[0], jnp.asarray(np.arange(out['draft_logits'].shape[-1])))))
  return {**out, 'seconds': seconds}


def demo(session, params, prompt: str) -> dict:
  """Each depth's top-5 at the end of the prompt, the step-by-step chain beside the MTP draft,
  and what one verification step accepted, with their times."""
  D = session.cfg.mtp_depth
  ids = check_demo(session, prompt)
  one = demo_step(session, params, ids)
  ar_state, ar_time = decode(session, params, [ids], dec.Settings(
      draft_len=0, max_new_tokens=D + 1, stop_ids=session.stop_ids))
  chain = dec.outputs(ar_state)[0]
  print(f'prompt: {prompt!r} ({len(ids)} tokens)')
  drafts_over = len(one['draft_tokens'])  # the tokens the heads' probabilities are over
  print('top-5 predictions at the end of the prompt' + (
      '' if drafts_over == session.cfg.vocab_size else
      f" (the heads' over their {drafts_over}-token draft vocabulary)") + ':')
  print(f'  step 0 (t+1, trunk):   {_top5(session, one["trunk_logits"])}')
  for k in range(1, D + 1):
    print(f'  step {k} (t+{k + 1}, depth {k}): '
          f'{_top5(session, one["draft_logits"][k - 1], one["draft_tokens"])}')
  print(f'autoregressive chain, {len(chain)} trunk forwards ({ar_time * 1e3:.1f} ms):')
  for j in range(1, len(chain) + 1):
    print(f'  prompt + {_text(session, chain[:j])!r}')
  first, drafts = int(one['first']), one['drafts'].tolist()
  accepted, count = int(one['accepted']), int(one['count'])
  emitted = [first] + one['committed'][:count].tolist()
  print(f"MTP one-shot draft ({one['seconds'] * 1e3:.1f} ms for prefill + one draft-and-verify "
        f'step): {_text(session, [first])!r} + drafts {[_text(session, [t]) for t in drafts]}')
  if first in session.stop_ids:  # the row ended at prefill: the step verified nothing
    print(f'the trunk ended the answer at its first token, {_text(session, [first])!r}: no draft '
          'was verified')
  else:
    end = ', the last of them ending the answer' if emitted[-1] in session.stop_ids else ''
    print(f'verification accepted {accepted} of {D} drafts and emitted '
          f'{_text(session, emitted)!r} ({len(emitted)} tokens from 2 trunk forwards{end})')
  return {'prompt_tokens': len(ids), 'ar_chain': chain, 'drafts': drafts, 'accepted': accepted,
          'emitted': emitted, 'ar_ms': ar_time * 1e3, 'mtp_ms': one['seconds'] * 1e3}


def read_prompts(session, prompt: str, prompt_file: str) -> list[list[int]]:
  """--prompt TEXT, or --prompt_file with one prompt a line ('ids: 1 2 3' for raw token ids; text
  goes through the chat template when decode.chat is on)."""
  if prompt_file:
    lines, flag = prompt_lines(prompt_file, '--prompt_file'), '--prompt_file'
  else:
    lines, flag = [prompt] if prompt else [], '--prompt'
  if not lines:
    raise ConfigError('give a non-empty --prompt or --prompt_file')
  return [prompt_ids(session, line, session.config.decode.chat, flag) for line in lines]


def generate(session, params, prompts: list[list[int]], config) -> dict:
  s = settings(config, stop_ids=session.stop_ids)
  state, seconds = decode(session, params, prompts, s, key=config.seed)
  out = dec.outputs(state)
  for p, o in zip(prompts, out):
    print(f'--- prompt: {_text(session, p)!r}')
    print(_text(session, o))
  result = {**dec.stats(state, s), 'outputs': out}
  result['tokens_per_s'] = sum(len(o) for o in out) / seconds
  print(f"--- {config.decode.method} S={s.draft_len}: tau {result['tau']:.2f}, "
        f"acceptance {np.round(result['acceptance_per_position'], 3).tolist()}, "
        f"{result['tokens_per_s']:.1f} tokens/s")
  return result


def bench_blocks(session, params, config, prompts):
  """ar and mtp (S = 1..D) at batch 1 and 8, greedy and temperature 1, on `prompts`, yielded as
  one list of rows per (temperature, batch) as each finishes. A greedy mtp row says whether
  every prompt's output is ar's at batch 1, and for how many it is (so does the greedy ar row
  at batch 8: rows decoded beside others give each prompt its own output). Batch 1 decodes each
  prompt alone; batch 8 decodes them all through 8 rows (as many as there are prompts, if
  fewer), a row taking the next prompt when its own finishes. Each call's time is its fastest of decode.bench_rounds
  rounds, every round running all methods in turn, so a slow spell slows them alike."""
  d = config.decode
  greedy_ar = None  # the outputs every greedy row is compared with: ar's at batch 1
  for temperature in (0.0, 1.0):
    for batch in sorted({1, min(8, len(prompts))}):  # fewer than 8 prompts fill fewer rows
      groups = [[p] for p in prompts] if batch == 1 else [prompts]
      per_S = bench_settings(session, config, temperature)
      width = max(len(p) for p in prompts)  # one compilation per setting, not per prompt
      calls = [prepared_decoder(session.decode_model, params, group, s, key=g, batch=batch,
                                width=width)
               for g, group in enumerate(groups) for s in per_S]
      seconds, outputs = measure.fastest(
          calls, d.bench_rounds, desc=f'bench: temperature {temperature:g}, batch {batch}')
      best = np.asarray(seconds).reshape(len(groups), len(per_S)).T  # [method, group]
      reference, rows = None, []
      for S, s in enumerate(per_S):
        states = outputs[S::len(per_S)]
        outs = [o for state in states for o in dec.outputs(state)]
        pooled = dec.pooled_rates(states, s)
        tokens_per_s = sum(len(o) for o in outs) / best[S].sum()
        if S == 0:
          reference = {'outs': outs, 'tokens_per_s': tokens_per_s}
          if temperature == 0 and batch == 1:
            greedy_ar = outs
        compared = temperature == 0 and (S > 0 or batch > 1)
        same = prompts_identical(outs, greedy_ar) if compared else None
        rows.append({
            'method': 'ar' if S == 0 else 'mtp', 'draft_len': S, 'batch': batch,
            'temperature': temperature, 'tau': pooled['tau'],
            'acceptance_per_position': np.round(pooled['acceptance_per_position'], 4).tolist(),
            'tokens_per_s': tokens_per_s, 'speedup': tokens_per_s / reference['tokens_per_s'],
            'candidates': s.candidates,
            'candidate_depth': s.branch_depth,
            'identical_to_ar': same == len(outs) if compared else None,
            'prompts_identical_to_ar': same, 'prompts': len(outs)})
      yield rows


def prompts_identical(outs: list[list[int]], reference: list[list[int]]) -> int:
  """How many prompts' outputs are the reference's token for token (a bench row's
  prompts_identical_to_ar; identical_to_ar when it is all of them)."""
  if len(outs) != len(reference):
    raise ValueError(f'{len(outs)} outputs against {len(reference)} reference outputs')
  return sum(o == r for o, r in zip(outs, reference))


def batch1_sweep(params, prompts: list[list[int]], variants: list, rounds: int,
                 desc: str, same_as: list[int] | None = None) -> list[dict]:
  """Decoding of each prompt alone by every (model, settings) in `variants` (or (model, settings,
  params) for a variant with params of its own), the first the reference (`ar`), all timed in
  interleaved rounds (each call's fastest). Per variant: tau,
  acceptance per position, tokens/s, ms per loop iteration (tau / tokens/s: one verify forward,
  its drafts and bookkeeping, plus the prompt's prefill spread over the iterations), the speedup
  over the reference and whether every output equals the reference's (greedy variants; None
  when sampling), or with `same_as` that of variant same_as[i] (another model's `ar`, say).
  Prompts a variant cannot decode are a ConfigError before anything compiles."""
  width = max(len(p) for p in prompts)  # one compilation per variant, not per prompt
  for model, s, *_ in variants:
    check_batch1(model.cfg, prompts, [s])
  calls = [prepared_decoder(v[0], v[2] if len(v) > 2 else params, [p], v[1], width=width)
           for p in prompts for v in variants]
  seconds, states = measure.fastest(calls, rounds, desc=desc)
  per = len(variants)
  outs = lambda i: [dec.outputs(st)[0] for st in states[i::per]]
  rows = []
  for i, (_, s, *_) in enumerate(variants):
    pooled = dec.pooled_rates(states[i::per], s)
    rate = sum(len(o) for o in outs(i)) / sum(seconds[i::per])
    rows.append({'tau': pooled['tau'],
                 'acceptance': np.round(pooled['acceptance_per_position'], 3).tolist(),
                 # tau / tokens/s: the wall time per forward, the prefill's spread over them (as
                 # if its one token took 1/tau of an iteration), so an mtp row, with fewer
                 # forwards to share it, shows a little more than its loop's (under 1% here)
                 'tokens_per_s': rate, 'ms_per_iteration': 1e3 * pooled['tau'] / rate,
                 'speedup': rate / rows[0]['tokens_per_s'] if rows else 1.0,
                 'identical_to_ar': (outs(i) == outs(same_as[i] if same_as else 0)
                                     if s.temperature == 0 else None)})
  return rows


def bench_table(rows: list[dict]) -> str:
  lines = [f"{'method':6} {'S':>2} {'batch':>5} {'temp':>4} {'tau':>5} {'tokens/s':>9} "
           f"{'speedup':>7} {'identical':>9}  acceptance per position"]
  for r in rows:
    same = ('-' if r['identical_to_ar'] is None else 'True' if r['identical_to_ar'] else
            f"{r['prompts_identical_to_ar']}/{r['prompts']}")
    lines.append(f"{r['method']:6} {r['draft_len']:>2} {r['batch']:>5} {r['temperature']:>4.1f} "
                 f"{r['tau']:>5.2f} {r['tokens_per_s']:>9.1f} {r['speedup']:>7.2f} {same:>9}  "
                 f"{r['acceptance_per_position']}")
  return '\n'.join(lines)


def bench(session, params, config, step: int) -> dict:
  """bench_blocks, each block printed and WORKDIR/bench.json rewritten as it finishes, so a run
  stopped part way keeps what it measured ('complete' says whether every block is in). An
  earlier run's complete file becomes bench.previous.json: kept, and not looking current (a
  stopped run's part is replaced)."""
  prompts = held_out_prompts(session, config.decode.bench_prompts)
  check_bench(session, config, prompts)  # before the params are prepared for the kernels
  d = config.decode
  # what every row decodes with besides its S, batch and temperature (the sampled rows take the
  # config's top_k and top_p, every mtp row its candidates; each row says the candidates and
  # candidate_depth it ran with, as candidates.py's rows do: 1 and 0 without alternatives, a
  # branch cut to S)
  shared = {'prompts': len(prompts), 'max_new_tokens': d.max_new_tokens, 'top_k': d.top_k,
            'top_p': d.top_p, 'candidates': d.candidates, 'candidate_depth': d.candidate_depth,
            'rounds': d.bench_rounds}
  print('bench: ' + ', '.join(f'{k} {v}' for k, v in shared.items()), flush=True)
  result = {'machine': measure.machine(), 'checkpoint_step': step, 'settings': shared,
            'draft_vocab': d.draft_vocab, 'kernels': session.decode_model.kernels,
            'tiled_matrices': session.decode_model.tiled_matrices(params),
            'draft_dtype': session.decode_model.draft_dtype, 'complete': False, 'rows': []}
  path = bench_file(session.workdir)

  def save():  # by process 0 alone: each process times its own decoding
    if jax.process_index() == 0:
      atomic.write_json(path, result, indent=2)
  if jax.process_index() == 0 and _complete(path):
    os.replace(path, os.path.join(session.workdir, 'bench.previous.json'))
  save()
  for rows in bench_blocks(session, params, config, prompts):
    print(bench_table(rows), flush=True)
    result['rows'] += rows
    save()
  result['complete'] = True
  save()
  return result


def bench_file(workdir: str) -> str:
  """Where bench writes its results."""
  return os.path.join(workdir, 'bench.json')


def _complete(path: str) -> bool:
  """Whether `path` holds a finished bench's bench.json (one written before benches said
  whether they were complete counts as finished)."""
  try:
    with open(path) as f:
      return json.load(f).get('complete', True) is True
  except (OSError, ValueError, AttributeError):
    return False


def bench_settings(session, config, temperature: float) -> list[dec.Settings]:
  """The settings bench decodes at a temperature: `ar`, then `mtp` at S = 1..D."""
  return [settings(config, draft=S, temperature=temperature, stop_ids=session.stop_ids)
          for S in range(session.cfg.mtp_depth + 1)]


def check_batch1(cfg, prompts: list[list[int]], settings_list, new_tokens: str = '') -> None:
  """check_prompts for each of `settings_list` as a sweep decodes them (each prompt alone,
  padded to the longest so that all share a compilation), on the model of ModelConfig `cfg`."""
  width = max(len(p) for p in prompts)
  for s in settings_list:
    check_prompts(prompts, cfg.vocab_size, s, cfg.max_seq_len, width, new_tokens)


def check_bench(session, config, prompts) -> None:
  """bench's one-line errors: its prompts at every S it decodes, and a bench.json it could not
  write, before it writes bench.json or compiles anything."""
  path = bench_file(session.workdir)
  if os.path.lexists(path) and not os.path.isfile(path):
    raise ConfigError(f'{path} is not a file, and bench writes one there: move it')
  check_batch1(session.cfg, prompts, bench_settings(session, config, 0.0))


def prompts_to_check(session, count: int) -> list[list[int]]:
  """held_out_prompts as far as they are known: decode.prompts' lines, validation windows once
  the data is there, else stand-ins of their length (decode.prompt_len)."""
  d = session.config.decode
  if d.prompts or session.data is not None:
    return held_out_prompts(session, count)
  return [[0] * d.prompt_len]


def check_mode(session, mode: str, prompt: str = '', prompt_file: str = '') -> None:
  """The one-line errors of a decoding mode's input (its prompts, the cache they need, its
  settings), for a mode that runs later in the command: checked before the modes before it run,
  or, after a training, before its first step. A mode that runs first checks its own."""
  config = session.config
  if mode == 'generate':
    check_mtp_decoding(config)
    check_prompts(read_prompts(session, prompt, prompt_file), session.cfg.vocab_size,
                  settings(config, stop_ids=session.stop_ids), session.cfg.max_seq_len)
  elif mode == 'demo':
    check_demo(session, prompt or config.decode.demo_prompt)
  elif mode == 'bench':
    check_bench(session, config, prompts_to_check(session, config.decode.bench_prompts))


def eval_hook(config):
  """The training-time check: greedy speculative decoding on a few validation prompts, logging
  tau, per-position acceptance and one generated sample to TensorBoard; returns tau and the
  acceptances as metrics (None when decode.eval_prompts=0 or the model has no heads). Its
  `check(session)` says what would stop its first evaluation, for the run to check before any
  step."""
  d = config.decode
  if d.eval_prompts < 1 or config.mtp.depth < 1:
    return None

  decode_settings = lambda session: dec.Settings(
      draft_len=config.mtp.depth, max_new_tokens=d.max_new_tokens, stop_ids=session.stop_ids)

  def check(session):
    check_prompts(prompts_to_check(session, d.eval_prompts), session.cfg.vocab_size,
                  decode_settings(session), session.cfg.max_seq_len)

  def hook(session, params, step, writer):
    prompts = held_out_prompts(session, d.eval_prompts)
    s = decode_settings(session)
    state = prepared_decoder(session.decode_model, params, prompts, s)()  # untimed: one decode
    st = dec.stats(state, s)
    metrics = {'decode/tau': float(st['tau']),
               **{f'decode/acceptance_{j}': float(a)
                  for j, a in enumerate(st['acceptance_per_position'], start=1)}}
    if writer is not None:
      for name, value in metrics.items():
        writer.add_scalar(name, value, step)
      sample = _text(session, prompts[0]) + ' ⟶ ' + _text(session, dec.outputs(state)[0])
      writer.add_text('decode/sample', sample, step)
    tqdm.tqdm.write(f"step {step} decode: tau {st['tau']:.2f}, acceptance "
          f"{np.round(st['acceptance_per_position'], 3).tolist()}")
    return metrics
  hook.check = check
  return hook
