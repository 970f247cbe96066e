"""Peer comparison on SmolLM2-135M-Instruct (CPU, greedy, batch 1): this project's `ar` and `mtp`
(S = 1..D) against Hugging Face transformers (`generate`, and its prompt-lookup decoding) and
llama.cpp through llama-cpp-python (the F32 weights, the original Q4_1 file, and F32 with
prompt-lookup decoding), on the same held-out prompts through the chat template, beside the
machine's memory-bandwidth ceiling. Every system runs in this one process, on the same --threads
cores, in interleaved timing rounds, so that a slow spell of the machine slows all of them alike.

Setup, once (the peers live in their own environment, never in CI's):
  python3 -m venv .venv-peers
  .venv-peers/bin/pip install -r requirements.txt -r requirements-peers.txt
Run: .venv-peers/bin/python experiments/bench_peers.py --out runs/smollm2/peers.json
     (--candidates 1,5 adds rows with first-draft candidates, decode.candidates; --heads
     last_block decodes with untrained heads; smoke: --num_prompts 1 --max_new_tokens 8
     --rounds 1)
The weights are all the same numbers: our trunk comes from the Q4_1 GGUF dequantized to float32;
transformers loads it from our export (launch.py --mode export, written to --workdir/export);
llama.cpp's F32 file is the Q4_1 file with every tensor dequantized (cached beside it). The F32
llama.cpp rows keep their KV cache in F32, as ours and transformers' do; the Q4_1 row runs as
llama.cpp ships it (F16 KV cache, its quantized matrix products). Both prompt-lookup rows draft
up to LOOKUP_TOKENS tokens from the last 2-gram's earlier occurrence.
Prints:
  1. checks: the export's logits on the first prompt against ours (max abs diff, whether they
     pass the tests' allclose at rtol = atol = 1e-4, argmax agreement; the export must load in
     transformers), and the prompts where llama.cpp's tokenizer or the export's chat template
     does not give our token ids (none, when they agree);
  2. a markdown table, a row per system: tokens/s (generated tokens, a stop token included, over
     the sum of each prompt's fastest of --rounds rounds, after one warm-up round; ours is
     compiled before it), x ours-ar, the fraction of the ceiling bandwidth / bytes that one
     decoding step reads (the float32 trunk; ours as decoding keeps it, DecodeModel.step_bytes; the
     Q4_1 file's tensors; speculative rows can pass 1), and how many prompts' greedy outputs
     equal ours-ar token for token; a line with the bytes a step reads, per system; then, for
     every prompt that differs, the first position where it does;
  3. the machine, the cores used, their read bandwidth (measure.read_bandwidth, just before the
     rounds) and the 1-minute load average before and after the rounds: on a busy machine
     torch's and llama.cpp's OpenMP threads wait on descheduled peers at every parallel region,
     so only a quiet machine's numbers compare the systems.
--out FILE.json keeps all of it, with every system's generated ids.
"""

import dataclasses
import json
import os
import sys
import tempfile
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import gguf  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import smollm2  # noqa: E402
from mtp_jax import atomic, cli  # noqa: E402
from mtp_jax import decode as dec  # noqa: E402
from mtp_jax import inference, measure, run, sharding, train  # noqa: E402
from mtp_jax.config import prompt_lines  # noqa: E402
from mtp_jax.pretrained import fetch, gguf_file  # noqa: E402
from mtp_jax.pretrained.tokenizer import chat_turn  # noqa: E402

_PROMPTS = flags.DEFINE_string('prompts', 'configs/prompts/instruct_heldout.txt',
                               'Held-out prompts, one user turn a line.')
_NUM_PROMPTS = flags.DEFINE_integer('num_prompts', 8, 'The first N prompts are decoded.',
                                    lower_bound=1)
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'New tokens per prompt at most.',
                                lower_bound=1)
_ROUNDS = cli.rounds_flag(3)
_THREADS = flags.DEFINE_integer('threads', 2, 'Cores every system runs on (the process is pinned '
                                'to the first N it may use).', lower_bound=1)
_OUT = flags.DEFINE_string('out', '', 'Write the results to this JSON file.')
_SKIP = flags.DEFINE_list('skip', [], 'Peers to leave out: hf, hf_lookup, llama_f32, llama_q4_1, '
                          'llama_lookup.')
_CANDIDATES = flags.DEFINE_list('candidates', ['1'], 'First-draft candidates K of our mtp rows '
                                '(decode.candidates): a row per K and S; 1 is the chain.')
_HEADS = flags.DEFINE_string('heads', '', 'mtp.init_from override (default: the config\'s).')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Run directory: its checkpoint, if any, is decoded '
                               'and exported (default: a temporary one, the pretrained trunk).')

PEERS = ('hf', 'hf_lookup', 'llama_f32', 'llama_q4_1', 'llama_lookup')
LOOKUP_TOKENS = 10  # prompt-lookup draft length, transformers' and llama-cpp-python's usual 10
GGML_F32 = 0  # ggml_type of a float32 KV cache


@dataclasses.dataclass
class System:
  name: str
  calls: list  # one per prompt: call() -> output
  tokens: Callable  # output -> the generated ids
  step_bytes: int  # what one decoding step reads: the weights
  settings: dec.Settings | None = None  # ours only


# Our decoders.


def float32_bytes(params) -> int:
  """Bytes of the trunk's weights in float32: what a float32 decoding step of it reads."""
  return sum(leaf.nbytes for key, tree in params['params'].items()
             if not key.startswith('mtp') for leaf in jax.tree.leaves(tree))


def our_settings(session, max_new: int, candidates: list[int]) -> list[dec.Settings]:
  """`ar`, then `mtp` at S = 1..D for each number of first-draft candidates K."""
  runs = [(0, 1)] + [(S, K) for K in candidates for S in range(1, session.cfg.mtp_depth + 1)]
  return [dec.Settings(draft_len=S, max_new_tokens=max_new, stop_ids=session.stop_ids,
                       candidates=K) for S, K in runs]


def our_systems(session, params, prompts: list[list[int]],
                settings: list[dec.Settings]) -> list[System]:
  """A system per settings (our_settings), each prompt its own compiled call, as
  inference.bench_blocks does at batch 1."""
  step_bytes = session.decode_model.step_bytes(params)
  systems = []
  width = max(len(ids) for ids in prompts)  # one compilation per S, shared by the prompts
  for s in settings:
    S, K = s.draft_len, s.candidates
    calls = [inference.prepared_decoder(session.decode_model, params, [ids], s, width=width)
             for ids in prompts]
    name = 'ours ar' if S == 0 else f'ours mtp S={S}' + (f' K={K}' if K > 1 else '')
    systems.append(System(name, calls, lambda state: dec.outputs(state)[0], step_bytes, s))
  return systems


def our_logits(session, params, ids: list[int]) -> np.ndarray:
  """The trunk's logits over a prompt, T x V, as the decoder computes them."""
  model = session.decode_model
  logits, _, _ = jax.jit(model.trunk)(model.prepare(params), np.asarray([ids]),
                                      np.arange(len(ids))[None],
                                      model.init_cache(1, len(ids))['trunk'])
  return np.asarray(logits[0])


# Hugging Face transformers.


def hf_systems(export_dir: str, prompts, max_new: int, stop_ids, threads: int, step_bytes: int,
               skip):
  """transformers' greedy `generate` and its prompt-lookup decoding on the export; returns the
  model too, for the checks."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  model = transformers.LlamaForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()

  def generate(ids, **extra):
    with torch.inference_mode():
      out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                           do_sample=False, max_new_tokens=max_new, eos_token_id=list(stop_ids),
                           pad_token_id=(stop_ids or [None])[0], **extra)
    return out[0, len(ids):].tolist()

  variants = {'hf': ('transformers', {}),
              'hf_lookup': ('transformers prompt-lookup',
                            {'prompt_lookup_num_tokens': LOOKUP_TOKENS})}
  return model, [System(name, [lambda ids=ids, extra=extra: generate(ids, **extra)
                               for ids in prompts], list, step_bytes)
                 for key, (name, extra) in variants.items() if key not in skip]


def hf_checks(model, export_dir: str, session, params, texts, prompts) -> dict:
  """The export against ours: logits on the first prompt, and its chat template's ids."""
  import torch
  import transformers
  with torch.inference_mode():
    theirs = model(torch.tensor([prompts[0]])).logits[0].numpy()
  ours = our_logits(session, params, prompts[0])
  tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
  ids = [tokenizer.apply_chat_template([{'role': 'user', 'content': t}], tokenize=True,
                                       add_generation_prompt=True, return_dict=False)
         for t in texts]
  return {'logits_max_abs_diff': float(np.abs(theirs - ours).max()),
          'logits_max_abs': float(np.abs(ours).max()),
          'logits_allclose_1e-4': bool(np.allclose(theirs, ours, rtol=1e-4, atol=1e-4)),
          'argmax_agree': float(np.mean(theirs.argmax(-1) == ours.argmax(-1))),
          'tokenizer_mismatches': mismatches(ids, prompts)}


# llama.cpp.


def gguf_bytes(path: str) -> int:
  return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def llama_generate(llm, ids: list[int], max_new: int, stop_ids) -> list[int]:
  llm.reset()  # else generate() would keep the KV cache of the previous run's common prefix
  out = []
  for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
    out.append(token)
    if token in stop_ids or len(out) == max_new:
      break
  return out


def llama_systems(q4_path: str, prompts, max_new: int, stop_ids, threads: int, skip):
  """llama.cpp's greedy decoding on the F32 and the Q4_1 file, and its prompt lookup on F32."""
  from llama_cpp import Llama
  from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
  n_ctx = max(map(len, prompts)) + max_new + LOOKUP_TOKENS + 1
  f32_path = gguf_file.rewritten(q4_path, gguf.GGMLQuantizationType.F32)
  f32_kv = {'type_k': GGML_F32, 'type_v': GGML_F32}
  variants = {
      'llama_f32': ('llama.cpp F32', f32_path, f32_kv),
      'llama_q4_1': ('llama.cpp Q4_1', q4_path, {}),
      'llama_lookup': ('llama.cpp F32 prompt-lookup', f32_path, {**f32_kv, 'draft_model':
                       LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS)})}
  systems = []
  for key, (name, path, extra) in variants.items():
    if key in skip:
      continue
    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                logits_all=False, verbose=False, **extra)
    systems.append(System(name, [lambda llm=llm, ids=ids:
                                 llama_generate(llm, ids, max_new, stop_ids)
                                 for ids in prompts], list, gguf_bytes(path)))
  return systems


def llama_tokenizer_mismatches(q4_path: str, rendered: list[str], prompts) -> list[dict]:
  from llama_cpp import Llama
  vocab = Llama(model_path=q4_path, vocab_only=True, verbose=False)
  return mismatches([vocab.tokenize(t.encode(), add_bos=False, special=True) for t in rendered],
                    prompts)


# Comparison and the ceiling.


def first_difference(a: list[int], b: list[int]) -> int | None:
  """The first position where two token lists differ (the shorter one's length if one is a
  prefix of the other), or None when they are equal."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def mismatches(ids: list[list[int]], prompts) -> list[dict]:
  return [{'prompt': i, 'first_difference': first_difference(a, b), 'ids': a}
          for i, (a, b) in enumerate(zip(ids, prompts)) if a != b]


def pin(threads: int) -> list[int]:
  """Pins this process, before any thread pool starts, to `threads` of the cores it may use, so
  XLA sizes its pool to them as torch and llama.cpp are told to; returns the cores."""
  cores = sorted(os.sched_getaffinity(0))
  if threads > len(cores):  # the peers would be told of threads no core runs
    cli.fail(f'--threads={threads}: this process may use {len(cores)} cores')
  cores = cores[:threads]
  os.sched_setaffinity(0, cores)
  return cores


def table(rows: list[dict]) -> str:
  lines = ['| system | tokens/s | x ours-ar | fraction of limit | identical to ar |',
           '|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['system']} | {r['tokens_per_s']:.1f} | {r['x_ours_ar']:.2f} | "
                 f"{r['fraction_of_limit']:.2f} | {r['identical_to_ar']}/{len(r['outputs'])} |")
  return '\n'.join(lines)


def summarize(systems: list[System], seconds: list[float], outputs: list, bandwidth: float):
  """Per system: tokens/s from the sum of its prompts' fastest times, its ratio to ours-ar, its
  fraction of the bandwidth ceiling and its agreement with ours-ar, prompt by prompt."""
  n = len(systems[0].calls)
  rows = []
  for j, system in enumerate(systems):
    outs = [system.tokens(outputs[i * len(systems) + j]) for i in range(n)]
    spent = sum(seconds[i * len(systems) + j] for i in range(n))
    tokens = sum(map(len, outs))
    rows.append({'system': system.name, 'tokens': tokens, 'seconds': spent,
                 'tokens_per_s': tokens / spent, 'step_bytes': system.step_bytes,
                 'ceiling_tokens_per_s': bandwidth / system.step_bytes,
                 'fraction_of_limit': tokens / spent / (bandwidth / system.step_bytes),
                 'outputs': outs})
    if system.settings is not None and system.settings.draft_len:
      state_stats = [dec.stats(outputs[i * len(systems) + j], system.settings) for i in range(n)]
      rows[-1]['tau'] = (sum(s['emitted'] for s in state_stats)
                         / max(sum(s['forwards'] for s in state_stats), 1))
  ar = rows[0]
  for r in rows:
    r['x_ours_ar'] = r['tokens_per_s'] / ar['tokens_per_s']
    r['first_difference'] = [first_difference(o, a) for o, a in zip(r['outputs'], ar['outputs'])]
    r['identical_to_ar'] = sum(d is None for d in r['first_difference'])
  return rows


def benchmark(workdir: str) -> dict:
  skip = set(_SKIP.value)
  if skip - set(PEERS):
    cli.fail(f"--skip: unknown {sorted(skip - set(PEERS))} (known: {', '.join(PEERS)})")
  if {'hf', 'hf_lookup'} - skip:
    cli.require_peers('torch', 'transformers')
  if {'llama_f32', 'llama_q4_1', 'llama_lookup'} - skip:
    cli.require_peers('llama_cpp')
  candidates = sorted(cli.positive_ints(_CANDIDATES.value, '--candidates', allow_empty=True))
  threads = _THREADS.value
  texts = prompt_lines(_PROMPTS.value, '--prompts', ids=False)[:_NUM_PROMPTS.value]
  if len(texts) < _NUM_PROMPTS.value:
    cli.fail(f'--prompts: {_PROMPTS.value} has {len(texts)} prompts, fewer than '
             f'--num_prompts={_NUM_PROMPTS.value}')
  cores = pin(threads)
  config = smollm2.get_config()
  if _HEADS.value:
    config.mtp.init_from = _HEADS.value
  session = train.Session(config, workdir, data=False, reads='bench')
  prompts = [inference.encode_prompt(session, t, chat=True) for t in texts]
  max_new, stop_ids = _MAX_NEW.value, session.stop_ids
  ours = our_settings(session, max_new, candidates)
  # our decoder's refusals, before the params
  inference.check_batch1(session.cfg, prompts, ours, new_tokens=f'--max_new_tokens={max_new}')
  _, params = inference.load_params(session)
  systems = our_systems(session, params, prompts, ours)
  checks = {}
  if not {'hf', 'hf_lookup'} <= skip:
    export_dir = run.export(config, workdir, 'float32')['directory']
    model, hf = hf_systems(export_dir, prompts, max_new, stop_ids, threads,
                           float32_bytes(params), skip)
    systems += hf
    checks['transformers_export'] = hf_checks(model, export_dir, session, params, texts, prompts)
  if not {'llama_f32', 'llama_q4_1', 'llama_lookup'} <= skip:
    q4_path = fetch.fetch('smollm2')
    systems += llama_systems(q4_path, prompts, max_new, stop_ids, threads, skip)
    rendered = [chat_turn(session, t) for t in texts]
    checks['llama_cpp_tokenizer_mismatches'] = llama_tokenizer_mismatches(q4_path, rendered,
                                                                          prompts)
  calls = [system.calls[i] for i in range(len(prompts)) for system in systems]
  load = os.getloadavg()[0]
  bandwidth = measure.read_bandwidth()['bytes_per_s']
  with sharding.active(session.mesh):
    seconds, outputs = measure.fastest(calls, _ROUNDS.value, warmup=True,
                                       desc='peers: decoding')
  return {'machine': measure.machine(), 'cores': cores, 'threads': threads,
          'load_average': [load, os.getloadavg()[0]],
          'bandwidth_bytes_per_s': bandwidth, 'prompts': prompts, 'max_new_tokens': max_new,
          'rounds': _ROUNDS.value, 'heads': config.mtp.init_from, 'checks': checks,
          'tiled_matrices': session.decode_model.tiled_matrices(params),
          'rows': summarize(systems, seconds, outputs, bandwidth)}


def report(result: dict):
  for name, check in result['checks'].items():
    print(f'{name}: {json.dumps(check)}')
  print()
  print(table(result['rows']))
  steps = {}  # the bytes a step reads, as the fractions of the limit count them
  for r in result['rows']:
    steps.setdefault(r['step_bytes'], []).append(r['system'])
  print('bytes a step reads: ' + '; '.join(f"{b / 1e6:.0f} MB ({', '.join(names)})"
                                            for b, names in steps.items()))
  print()
  for r in result['rows']:
    for i, d in enumerate(r['first_difference']):
      if d is not None:
        print(f"{r['system']}: prompt {i} differs from ours-ar first at position {d}")
  before, after = result['load_average']
  print(f"{result['machine']}; cores {result['cores']}; read bandwidth "
        f"{result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; load average {before:.1f} before the "
        f"rounds, {after:.1f} after (a busy machine slows the OpenMP peers far more than ours); "
        f"ours: {result['tiled_matrices']} trunk matrices tiled (decode.tiles)")


def main(argv):
  cli.start(argv)  # Orbax logs its checkpoint manager at INFO
  cli.output_file(_OUT.value, '--out')
  with tempfile.TemporaryDirectory() as tmp:
    try:
      result = benchmark(_WORKDIR.value or tmp)
    except run.USER_ERRORS as e:  # as launch.py: a wrong flag or file is one line
      cli.fail(e)
  report(result)
  if _OUT.value:
    atomic.write_json(_OUT.value, result, indent=2)  # a crash leaves the previous file whole


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser())
