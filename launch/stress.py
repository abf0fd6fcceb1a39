r"""MoEMIL against the simple baselines on stress cohorts, over several cohort seeds.

python -m launch.stress --out=runs/stress --presets=realistic,hard --seeds=0,1,2,3,4

For each preset and seed: writes a synthetic store (`launch.synth --kind=store`), trains the
models with their default configs exactly as a user would (`launch.train`), evaluates them
with the baselines and the cohort's truth (`moemil_jax.evaluation`), and prints per preset
the external-test AUC and C-index of every model as mean (min-max) over seeds, beside the
posterior-mean ceiling (what the image views allow) and the oracle. Writes stress.csv (one
row per preset, seed and model) and stress.md. Finished (preset, seed) runs are reused.
"""

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from absl import flags, logging

from launch import cli

EXAMPLE = '--out=runs/stress --presets=realistic,hard --seeds=0,1,2,3,4'

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Output folder.', required=True)
flags.DEFINE_list('presets', ['realistic', 'hard'], 'Synthetic presets (launch.synth).')
flags.DEFINE_list('seeds', ['0', '1', '2', '3', '4'], 'Cohort seeds.')
flags.DEFINE_list('models', ['moemil'], 'Configs under moemil_jax/configs to train.')
flags.DEFINE_integer('patients', 404, 'Patients per cohort (as in the paper).')
flags.DEFINE_integer('median_patches', 200, 'Median patches per patient (CPU-sized bags).')
flags.DEFINE_multi_string('train_flag', [], 'Extra flags for launch.train, e.g. --config.x=1.')

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], log: Path) -> None:
  with open(log, 'w') as f:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(args[:3])} failed (exit {proc.returncode}); see {log}')


def _one_cohort(out: Path, preset: str, seed: int) -> pd.DataFrame:
  from moemil_jax import evaluation

  out.mkdir(parents=True, exist_ok=True)
  store = out / 'store'
  if not (store / 'STORE.json').exists():
    _run(
      [
        '-m',
        'launch.synth',
        '--kind=store',
        f'--preset={preset}',
        f'--out={store}',
        f'--patients={FLAGS.patients}',
        f'--seed={seed}',
        f'--median_patches={FLAGS.median_patches}',
      ],
      out / 'synth.log',
    )
  for model in FLAGS.models:
    workdir = out / 'runs' / model
    if (workdir / 'predictions.parquet').exists():
      continue
    t0 = time.time()
    _run(
      [
        '-m',
        'launch.train',
        f'--config={model}',
        f'--store={store}',
        f'--workdir={workdir}',
        *FLAGS.train_flag,
      ],
      out / f'train_{model}.log',
    )
    (workdir / 'seconds.txt').write_text(f'{time.time() - t0:.0f}\n')
    logging.info('%s seed %d: %s trained in %.0fs', preset, seed, model, time.time() - t0)
  ev = evaluation.evaluate(out / 'runs', truth=store / 'truth.csv', n_bootstrap=50)
  rows = []
  for name, res in ev.results['per_model'].items():
    rows.append(
      {
        'preset': preset,
        'seed': seed,
        'model': name,
        'auc': res['response']['test'].get('auc'),
        'cindex': res['survival']['test'].get('c_index'),
        # Development out-of-fold (every model refitted on the ensemble's folds).
        'oof_auc': res['response'].get('oof', {}).get('auc'),
        'oof_cindex': res['survival'].get('oof', {}).get('c_index'),
      }
    )
  return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> str:
  """Per preset: mean (min-max) over seeds of each model's external-test AUC and C-index."""
  from moemil_jax import evaluation

  lines = []
  for preset, part in table.groupby('preset', sort=False):
    seeds = part.seed.nunique()
    lines += [
      f'\n{preset} preset, {seeds} cohort seeds, external test (center B)\n',
      '| model | AUC mean (range) | C-index mean (range) |',
      '| --- | --- | --- |',
    ]
    order = list(dict.fromkeys(part.model))
    for model in order:
      m = part[part.model == model]
      cells = [f'{m[k].mean():.3f} ({m[k].min():.3f}-{m[k].max():.3f})' for k in ('auc', 'cindex')]
      lines.append(f'| {evaluation.display_name(model)} | {cells[0]} | {cells[1]} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  frames = []
  for preset in FLAGS.presets:
    for seed in (int(s) for s in FLAGS.seeds):
      logging.info('preset %s, seed %d', preset, seed)
      frames.append(_one_cohort(out / f'{preset}_seed{seed}', preset, seed))
      table = pd.concat(frames, ignore_index=True)
      table.to_csv(out / 'stress.csv', index=False)
  text = summary(table)
  (out / 'stress.md').write_text(text)
  print(text)


def run():
  cli.run(
    main,
    example=EXAMPLE,
    interrupted='interrupted: finished cohorts and models are kept; run the same command '
    'again to go on',
  )


if __name__ == '__main__':
  run()
