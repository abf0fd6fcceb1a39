r"""Scores new patients with trained models: a response probability and a risk group each,
with OS probabilities, a conformal response set and the members' spreads.

  python -m launch.predict --model=runs/moemil --store=NEW_STORE --out=predictions.csv
  python -m launch.predict --model=runs/seed0 --model=runs/seed1 --store=NEW_STORE \
      --out=predictions.csv --patients=NPC101,NPC102
  python -m launch.predict --model=runs/moemil --manifest=new_patients.csv \
      --store=NEW_STORE --out=predictions.csv

--model: a finished training workdir (its bundle/ holds everything the model needs); give
it several times to average runs (folds or seeds). --store: a feature store made with the
same encoder and settings as the training store (refused otherwise); with --manifest, the
new patients' images are first extracted into --store with exactly the settings the model
was trained with. Output columns: see BUILD.md, "Predictions", and
docs/uncertainty.md (OS probabilities, conformal response sets, members' spreads, --cards).
"""

from absl import app, flags, logging

from launch import cli

EXAMPLE = '--model=runs/moemil --store=NEW_STORE --out=predictions.csv'

_MODELS = flags.DEFINE_multi_string('model', None, 'Training workdir(s) holding a bundle/.')
_STORE = flags.DEFINE_string('store', None, 'Feature store of the patients to score.')
_MANIFEST = flags.DEFINE_string(
  'manifest', None, 'Extract these patients into --store first (labels may be empty).'
)
_WEIGHTS = flags.DEFINE_string(
  'encoder_weights',
  None,
  'With --manifest: the encoder weights file, when the model was trained on features from '
  'a weights file (the bundle records only its name and hash).',
)
_WSI_WEIGHTS = flags.DEFINE_string(
  'wsi_encoder_weights',
  None,
  'With --manifest: the slide encoder weights file, when the model was trained on features '
  "of a weights file other than the MRI encoder's.",
)
_FALLBACK_MPP = flags.DEFINE_float(
  'fallback_mpp', None, 'With --manifest: um/px of slides with no MPP (as launch.extract).'
)
_FROM_OBJECTIVE = flags.DEFINE_bool(
  'mpp_from_objective',
  False,
  'With --manifest: MPP-less slides get 10 / their objective power (as launch.extract).',
)
_DEVICE = flags.DEFINE_string('device', 'cpu', 'With --manifest: torch device for extraction.')
_FEATURES_DIR = flags.DEFINE_string(
  'features_dir',
  None,
  'With --manifest, for a model trained on imported CLAM / TRIDENT features: the folder of '
  "the new patients' <slide>.h5 files (made by the same pipeline), imported as training's were.",
)
_OUT = flags.DEFINE_string('out', None, 'Output CSV, one row per patient.')
_PATIENTS = flags.DEFINE_list('patients', None, 'Only these patient ids.')
_EXPLAIN = flags.DEFINE_bool(
  'explain',
  False,
  "With --manifest: each patient's slide attention heatmaps and MRI Grad-CAM (of the first "
  "--model; member 0 of an ensemble) into <out's folder>/explain/, as launch.explain does.",
)
_HORIZONS = flags.DEFINE_list(
  'horizons', ['12', '36', '60'], 'OS probability horizons in months (os_prob_<h>m columns).'
)
_LEVEL = flags.DEFINE_float(
  'conformal_level', 0.9, 'Coverage level of the conformal response sets (response_set).'
)
_SPREAD = flags.DEFINE_float(
  'spread_warning',
  0.2,
  "Warn when the members' response (or 36-month OS) probabilities span more than this.",
)
_CURVES = flags.DEFINE_string(
  'curves', None, "Also write every patient's whole OS curve (long format) to this CSV."
)
_CARDS = flags.DEFINE_string(
  'cards', None, 'Write one patient card per patient (PNG and HTML) into this folder.'
)
_CARD_FORMATS = flags.DEFINE_list('card_formats', ['png', 'html'], 'With --cards: png, html.')
flags.mark_flags_as_required(['model', 'store', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from pathlib import Path

  from moemil_jax import bundle, predict, uncertainty

  try:
    horizons = [float(h) for h in _HORIZONS.value]
  except ValueError:
    raise cli.UserError(
      f'--horizons={",".join(_HORIZONS.value)}: give months as numbers, e.g. 12,36,60'
    ) from None
  if not 0 < _LEVEL.value < 1:
    raise cli.UserError(f'--conformal_level={_LEVEL.value}: use a value between 0 and 1, e.g. 0.9')
  bad = [f for f in _CARD_FORMATS.value if f not in ('png', 'html')]
  if _CARDS.value and bad:
    raise cli.UserError(f'--card_formats={",".join(_CARD_FORMATS.value)}: use png and/or html')
  options = uncertainty.Options(horizons=horizons, level=_LEVEL.value, spread_warning=_SPREAD.value)
  try:
    models = [predict.load_bundle(path) for path in _MODELS.value]
    if _FEATURES_DIR.value and not _MANIFEST.value:
      raise cli.UserError('--features_dir needs --manifest: the new patients to import')
    if _MANIFEST.value and _FEATURES_DIR.value:
      from feature_store import imported

      icfg = predict.import_config(
        models[0].meta, _FEATURES_DIR.value, device=_DEVICE.value, weights=_WEIGHTS.value
      )
      summary = imported.import_features(_MANIFEST.value, _STORE.value, icfg)
      if summary.failed:
        logging.warning('%d item(s) failed to import: see %s', summary.failed, _STORE.value)
    elif _MANIFEST.value:
      from feature_store import extract

      cfg = predict.extraction_config(
        models[0].meta,
        device=_DEVICE.value,
        weights=_WEIGHTS.value,
        wsi_weights=_WSI_WEIGHTS.value,
        fallback_mpp=_FALLBACK_MPP.value,
        mpp_from_objective=_FROM_OBJECTIVE.value,
      )
      summary = extract.extract(_MANIFEST.value, _STORE.value, cfg)
      if summary.failed:
        logging.warning('%d item(s) failed to extract: see %s', summary.failed, _STORE.value)
    table = predict.predict_ensemble(models, _STORE.value, _PATIENTS.value, options)
  except (bundle.BundleError, ValueError, FileNotFoundError) as e:
    raise cli.UserError(str(e)) from None
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  table.to_csv(out, index=False)
  if _EXPLAIN.value:
    if not _MANIFEST.value:
      raise cli.UserError('--explain needs --manifest: the heatmaps are drawn on the slides')
    from launch import explain

    pictures = explain.explain(
      _MODELS.value[0],
      list(table.patient_id),
      manifest=_MANIFEST.value,
      encoder_weights=_WEIGHTS.value,
      device=_DEVICE.value,
      store_dir=_STORE.value,
      out_dir=out.parent / 'explain',
    )
    print(f'{len(pictures)} explanation images -> {out.parent / "explain"}')
  if _CURVES.value:
    curves = uncertainty.curves(table)
    Path(_CURVES.value).parent.mkdir(parents=True, exist_ok=True)
    curves.to_csv(_CURVES.value, index=False)
    print(f'OS curves of {curves.patient_id.nunique()} patients -> {_CURVES.value}')
  if _CARDS.value:
    from moemil_jax import patient_card

    cards = patient_card.write_cards(
      table,
      _CARDS.value,
      explain_dir=out.parent / 'explain' if _EXPLAIN.value else None,
      formats=_CARD_FORMATS.value,
    )
    print(f'{len(cards)} patient card files -> {_CARDS.value}')
  extras = uncertainty.extras(table)
  for note in extras.notes if extras else []:
    print(f'note: {note}')
  warned = int((table.warnings != '').sum())
  print(
    f'{len(table)} patients scored by {table.model.iloc[0]} -> {out} '
    f'(response threshold {table.attrs["threshold"]:.3f}, risk cutoff '
    f'{table.attrs["cutoff"]:.3f}; {warned} with warnings)'
  )


def run():
  cli.run(main, example=EXAMPLE)


if __name__ == '__main__':
  run()
