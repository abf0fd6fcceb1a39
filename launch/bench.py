"""Runs the benchmark suite and prints its table; writes bench.json and BENCH.md.

python -m launch.bench [--quick] [--device=cpu|gpu] [--only=p1,padding,p2,...] [--out=DIR]
"""

from absl import flags, logging

from launch import cli

EXAMPLE = '--quick [--device=gpu] [--only=p1,p3]'

_QUICK = flags.DEFINE_bool('quick', False, 'Small sizes: a smoke run in about a minute.')
_DEVICE = flags.DEFINE_enum('device', 'cpu', ['cpu', 'gpu'], 'Where JAX and PyTorch run.')
_ONLY = flags.DEFINE_list('only', 'p1,padding,p2,p3,p4,p5,p6,eval', 'Figures to run.')
_OUT = flags.DEFINE_string('out', 'bench_out', 'Directory for bench.json and BENCH.md.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Scratch directory for stores (reused if given).')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  import os

  if _DEVICE.value == 'cpu':
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from moemil_jax.bench import suite  # after flag parsing: keeps --help fast

  report = suite.run_suite(
    quick=_QUICK.value,
    only=tuple(f.strip().lower() for f in _ONLY.value),
    device=_DEVICE.value,
    workdir=_WORKDIR.value,
  )
  print(suite.table(report))
  json_path, md_path = suite.write_reports(report, _OUT.value)
  logging.info('wrote %s and %s', json_path, md_path)


def run():
  cli.run(main, example=EXAMPLE)


if __name__ == '__main__':
  run()
