r"""Writes the result tables of README.md and docs/*.md from the committed outputs in docs/.

python -m launch.docs            # rewrite every generated table
python -m launch.docs --check    # change nothing; exit 1 naming each table that differs

A table sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; NAME is one of
moemil_jax.docs_tables.TABLES, each written from the CSV / JSON outputs of launch.stress and
launch.bench kept in docs/. After a new run, copy its output into docs/ and run this.
"""

import sys
from pathlib import Path

from absl import flags

from launch import cli

EXAMPLE = '[--check]'

_CHECK = flags.DEFINE_bool('check', False, 'Compare only: exit 1 if a document differs.')
_ROOT = flags.DEFINE_string(
  'root', None, 'Repository whose README.md, BUILD.md and docs/*.md to write (default: this one).'
)


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  from moemil_jax import docs_tables

  root = Path(_ROOT.value) if _ROOT.value else docs_tables.ROOT
  try:
    stale = docs_tables.run(root, check=_CHECK.value)
  except docs_tables.DocsError as e:
    raise cli.UserError(str(e)) from e
  for doc, table in stale:
    source = ', '.join(f'docs/{s}' for s in docs_tables.TABLES[table].sources)
    if _CHECK.value:
      print(
        f'{doc}: table {table} differs from {source}; run python -m launch.docs', file=sys.stderr
      )
    else:
      print(f'{doc}: wrote table {table} from {source}')
  if _CHECK.value and stale:
    sys.exit(cli.EXIT_FAILURES)


def run():
  cli.run(main, example=EXAMPLE)


if __name__ == '__main__':
  run()
