"""One of two processes that test `distributed.on_primary` (tests/test_distributed.py).

  python -m tests.primary_checks PORT PROCESS_ID

Process 0's stage passes, fails, then overruns `primary_timeout`; prints one
JSON object: per stage, its value or error and the seconds this process spent.
"""

import json
import sys
import time

from dnnr_jax.errors import DnnrError
from dnnr_jax.io import distributed

PRIMARY_TIMEOUT_S = 2
SLOW_STAGE_S = 8  # Well past the timeout: the others must not wait for it.


def _fails():
  raise DnnrError('the stage failed on process 0.')


def _slow():
  time.sleep(SLOW_STAGE_S)
  return 'late'


def main(port: int, process_id: int) -> dict:
  distributed.initialize(distributed.ProcessGroup(
      coordinator=f'localhost:{port}', num_processes=2, process_id=process_id, timeout_s=60,
      primary_timeout=PRIMARY_TIMEOUT_S))
  results = {}
  for stage, work in (('passes', lambda: 'written'), ('fails', _fails), ('slow', _slow)):
    start = time.monotonic()
    try:
      results[stage] = {'value': distributed.on_primary(stage, work)}
    except DnnrError as error:
      results[stage] = {'error': str(error)}
    results[stage]['seconds'] = time.monotonic() - start
  return results


if __name__ == '__main__':
  print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
