"""launch.py as test_multiprocess.py runs it: the same command line, with the TensorBoard writer
leaving WORKDIR/tb_opened_by_process_I behind, so the test sees which processes opened one, and
with MTP_TEST_SIGTERM=I:N process I sending itself SIGTERM as step N's metrics are queued (as a
scheduler preempting one process of a job)."""

import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from mtp_jax import train  # noqa: E402


class RecordingWriter(train.SummaryWriter):

  def __init__(self, logdir, **kwargs):
    super().__init__(logdir, **kwargs)
    marker = os.path.join(os.path.dirname(logdir), f'tb_opened_by_process_{jax.process_index()}')
    open(marker, 'a').close()


def signal_self_at(process: int, step: int):
  push = train.MetricsLog.push

  def pushed(self, at, metrics):
    push(self, at, metrics)
    if at == step and jax.process_index() == process:
      os.kill(os.getpid(), signal.SIGTERM)
  train.MetricsLog.push = pushed


if __name__ == '__main__':
  train.SummaryWriter = RecordingWriter
  if os.environ.get('MTP_TEST_SIGTERM'):
    signal_self_at(*map(int, os.environ['MTP_TEST_SIGTERM'].split(':')))
  sys.argv[0] = os.path.join(REPO, 'launch.py')
  runpy.run_path(sys.argv[0], run_name='__main__')
