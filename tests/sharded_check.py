"""The 8-device half of test_sharding.py. JAX fixes the host device count when it starts and the
rest of the suite runs on one device, so the test runs this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8:

  python tests/sharded_check.py ROOT TOKENIZER

It trains run_config on each mesh of MESHES (workdirs ROOT/mesh_DxFxT), restores the (2,4,1)
checkpoint onto (2,2,2), decodes on the (2,2,2) mesh (prompts split over the batch axes, and
replicated as inference.decode leaves them), and writes what it saw to ROOT/sharded.json
and the cross-mesh restore to ROOT/restored_on_2x2x2.npz. The test imports the meshes, the config
and the decoding from here, so that both halves run the same.
"""

import dataclasses
import json
import os
import sys

import jax
import numpy as np

from conftest import flat, restore, text_config
from mtp_jax import decode as dec
from mtp_jax import inference, sharding, train
from mtp_jax.config import ConfigError

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
SAVED_ON, RESTORED_ON = (2, 4, 1), (2, 2, 2)
GREEDY = dec.Settings(draft_len=2, max_new_tokens=12)
TREE = dataclasses.replace(GREEDY, candidates=3, candidate_depth=2)  # a draft tree 3,1


def run_config(root: str, mesh=None, tokenizer: str = ''):
  """The tiny model on the shared corpus, batch 8 so that every mesh splits it; mesh is (data,
  fsdp, tensor), or None for the default (all devices on data)."""
  overrides = {'data.tokenizer': tokenizer, 'data.cache_dir': os.path.join(root, 'data'),
               'train.batch_size': 8, 'train.checkpoint_every': 4}
  if mesh is not None:
    overrides.update(zip(('mesh.data', 'mesh.fsdp', 'mesh.tensor'), mesh))
  return text_config(**overrides)


def workdir(root: str, mesh) -> str:
  return os.path.join(root, 'mesh_' + 'x'.join(map(str, mesh)))


def prompts(session) -> list[list[int]]:
  """Eight validation prompts of 6..13 tokens, so the batch holds right-padded rows."""
  return [p[:6 + i] for i, p in enumerate(inference.validation_prompts(session, 8, 13))]


def greedy_decode(session, params, prompt_list, s: dec.Settings = GREEDY):
  """Speculative greedy decoding on the session's mesh, the prompts split over the batch axes
  like a training batch; returns (tokens per row, the prompt array's sharding spec)."""
  prompts_BxP, lens_B = dec.pad_prompts(prompt_list)
  fn = dec.compiled_decoder(dec.DecodeModel(session.cfg), s,
                            dec.cache_length(prompts_BxP.shape[1], s))
  prompts_BxP = jax.device_put(prompts_BxP, session.batch_sharding)
  lens_B = jax.device_put(lens_B, session.batch_sharding)
  with sharding.active(session.mesh):
    state = fn(params, prompts_BxP, lens_B, jax.random.key(0))
  return dec.outputs(state), str(prompts_BxP.sharding.spec)


def layout(tree) -> dict:
  """{path: [partition spec, shape of one device's shard]} of every leaf."""
  return {jax.tree_util.keystr(path): [str(leaf.sharding.spec),
                                       list(leaf.addressable_shards[0].data.shape)]
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main(root: str, tokenizer: str):
  if jax.device_count() != 8:
    raise SystemExit(f'needs 8 devices (XLA_FLAGS), found {jax.device_count()}')
  result = {'eval': {}}
  for mesh in MESHES:
    summary = train.train(run_config(root, mesh, tokenizer), workdir(root, mesh))
    result['eval']['x'.join(map(str, mesh))] = summary['eval']

  session, state = restore(run_config(root, RESTORED_ON, tokenizer), workdir(root, RESTORED_ON))
  result['layout'] = layout(state)
  tokens, prompt_spec = greedy_decode(session, state['params'], prompts(session))
  # As launch.py's generate and bench modes decode: prompts replicated.
  with sharding.active(session.mesh):
    replicated, _ = inference.decode(session, state['params'], prompts(session), GREEDY)
  result['decode'] = {'tokens': tokens, 'prompt_spec': prompt_spec,
                      'replicated_prompts_tokens': dec.outputs(replicated),
                      'tree_tokens': greedy_decode(session, state['params'], prompts(session),
                                                   TREE)[0]}

  _, saved = restore(run_config(root, SAVED_ON, tokenizer), workdir(root, SAVED_ON))
  _, moved = restore(run_config(root, RESTORED_ON, tokenizer), workdir(root, SAVED_ON))
  result['cross_mesh'] = {
      'layout': layout(moved),
      'bitwise_equal': all(a.dtype == b.dtype and a.tobytes() == b.tobytes()
                           for a, b in zip(flat(saved).values(), flat(moved).values())),
  }
  np.savez(os.path.join(root, 'restored_on_2x2x2.npz'), **flat(moved))

  # The Session refuses a mesh that does not divide the model before it compiles anything.
  try:
    train.Session(run_config(root, (2, 1, 4), tokenizer), os.path.join(root, 'rejected'))
    result['rejected'] = None
  except ConfigError as e:
    result['rejected'] = str(e)
  # A mode that only decodes lays out its prompts for any count: a training batch the mesh
  # does not split (4 rows on 8 devices) refuses training there, not decoding.
  odd_batch = run_config(root, (8, 1, 1), tokenizer)
  odd_batch.train.batch_size = 4
  result['odd_batch'] = {}
  for mode in ('', 'eval', 'generate', 'export'):
    try:
      train.Session(odd_batch, workdir(root, (8, 1, 1)), data=False, reads=mode)
      result['odd_batch'][mode] = None
    except ConfigError as e:
      result['odd_batch'][mode] = str(e)

  # Gradient accumulation over the data axis moves no rows between devices: the train step's
  # only collectives are the gradients' and metrics' all-reduces.
  accum = run_config(root, (8, 1, 1), tokenizer)
  accum.train.batch_size, accum.train.grad_accum = 16, 2
  program = train.Program(accum, sharding.make_mesh(accum.mesh))
  batch = jax.ShapeDtypeStruct((16, train.window_length(accum)), np.int32,
                               sharding=program.batch_sharding)
  with sharding.active(program.mesh):
    hlo = program.lower_train_step(batch, program.draft_ids).compile().as_text()
  result['grad_accum_collectives'] = {
      op: hlo.count(f' {op}(') + hlo.count(f' {op}-start(')
      for op in ('all-reduce', 'all-gather', 'all-to-all', 'collective-permute', 'reduce-scatter')}

  with open(os.path.join(root, 'sharded.json'), 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  main(*sys.argv[1:])
