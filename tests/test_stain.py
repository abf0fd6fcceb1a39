"""Stain normalisation (feature_store/stain.py): parity with torchstain, fallbacks,
determinism, the real H&E tiles, the real slide's tissue mask, and the store fingerprint."""

import dataclasses
import json

import numpy as np
import pytest
import tiny_extraction
import torch
import torchstain
from skimage.exposure import match_histograms

from feature_store import extract, slides, stain, store

# torchstain's own settings: estimates from every pixel, its OD threshold.
TORCHSTAIN = stain.StainParams(fit_stride=1, beta=0.15)


@pytest.fixture(scope='module')
def tiles(shared_data):
  strong = shared_data / 'he_tile_strong.png'
  if not strong.exists():
    pytest.skip(f'{strong} not found')
  return stain.read_image(strong), stain.read_image(shared_data / 'he_tile_pale.png')


def _chw(image):
  return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def _torchstain_macenko(image):
  """torchstain's numpy Macenko estimate (stain vectors (3, 2), max concentrations (2,))."""
  n = torchstain.normalizers.MacenkoNormalizer(backend='numpy')
  n.fit(image)
  return n.HERef, n.maxCRef


def _angles(a, b):
  cos = (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
  return np.degrees(np.arccos(np.clip(cos, -1, 1)))


@pytest.mark.parametrize('method', ['macenko', 'reinhard'])
def test_batched_normalisation_matches_torchstain_patch_by_patch(tiles, method):
  strong, pale = tiles
  if method == 'macenko':
    ref = torchstain.normalizers.MacenkoNormalizer(backend='torch')
  else:
    ref = torchstain.normalizers.ReinhardNormalizer(backend='torch')
  ref.fit(_chw(pale))
  target = stain.fit_target(pale[None], method, 'pale tile', TORCHSTAIN)
  if method == 'macenko':
    np.testing.assert_allclose(
      np.array(target.values['stain_vectors']).T, ref.HERef.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(target.values['max_concentrations'], ref.maxCRef, rtol=1e-4)
  else:
    np.testing.assert_allclose(target.values['lab_mean'], ref.target_means, atol=1e-3)
    np.testing.assert_allclose(target.values['lab_std'], ref.target_stds, atol=1e-3)
  # Three different crops in one batch, each compared with torchstain on its own.
  crops = np.stack([strong[:256, :256], strong[150:406, 300:556], pale[100:356, 200:456]])
  got, fallbacks = stain.normalise_numpy(crops, target)
  assert fallbacks == 0
  for crop, mine in zip(crops, got):
    if method == 'macenko':
      want = ref.normalize(_chw(crop), stains=False)[0].numpy()
    else:
      want = ref.normalize(_chw(crop)).numpy()
    # torchstain truncates to integers, this code rounds: at most one grey level apart.
    assert np.abs(mine.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize('direction', ['strong_to_pale', 'pale_to_strong'])
def test_histogram_matching_matches_scikit_image(tiles, direction):
  """With every pixel counted as tissue, each channel's table is scikit-image's
  match_histograms, per patch and from a slide's or center's stain alike."""
  strong, pale = tiles
  source, reference = (strong, pale) if direction == 'strong_to_pale' else (pale, strong)
  every_pixel = stain.StainParams(beta=-10.0, fit_stride=1)
  target = stain.fit_target(reference[None], 'histogram', 'reference tile', every_pixel)
  want = np.round(match_histograms(source, reference, channel_axis=-1))
  per_patch, fallbacks = stain.normalise_numpy(source[None], target)
  assert fallbacks == 0
  norm = stain.Normaliser(target, scope='center')
  norm.use_stain(stain.fit_target(source[None], 'histogram', 'source', every_pixel))
  shared = norm(torch.from_numpy(source[None].copy())).numpy()
  for got in (per_patch[0], shared[0]):  # float32 and 6-decimal tables: a grey level at most
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_blank_one_colour_and_ink_patches_fall_back_unchanged_and_are_counted(tiles):
  strong, pale = tiles
  target = stain.fit_target(pale[None], 'macenko', 'pale tile')
  rng = np.random.default_rng(0)
  glass = np.clip(rng.normal(242, 2, (64, 64, 3)), 0, 255).astype(np.uint8)
  one_colour = np.full((64, 64, 3), (180, 90, 160), np.uint8)  # flat eosin-like pink
  ink = np.full((64, 64, 3), (40, 90, 150), np.uint8)  # blue marker
  black = np.zeros((64, 64, 3), np.uint8)
  tissue = strong[:64, 100:164]
  batch = np.stack([glass, one_colour, ink, black, tissue])
  for method in stain.STAIN_METHODS:
    tgt = target if method == 'macenko' else stain.fit_target(pale[None], method, 'pale')
    out, fallbacks = stain.normalise_numpy(batch, tgt)
    np.testing.assert_array_equal(out[:4], batch[:4], err_msg=method)  # kept as they were
    assert fallbacks == 4, (method, fallbacks)
    assert not np.array_equal(out[4], batch[4]), method  # the tissue patch is normalised
  # The estimate never yields NaN, whatever the input.
  est = stain.estimate(torch.from_numpy(batch), 'macenko')
  assert est['ok'].tolist() == [False, False, False, False, True]
  assert torch.isfinite(est['he']).all() and torch.isfinite(est['max_conc']).all()


def test_normalisation_is_deterministic_and_independent_of_the_batch(tiles):
  strong, pale = tiles
  crops = np.stack([strong[i : i + 128, i : i + 128] for i in range(0, 300, 60)])
  for method in stain.STAIN_METHODS:
    target = stain.fit_target(pale[None], method, 'pale tile')
    first, _ = stain.normalise_numpy(crops, target)
    again, _ = stain.normalise_numpy(crops, target)
    np.testing.assert_array_equal(first, again)
    alone, _ = stain.normalise_numpy(crops[2:3], target)
    assert np.abs(alone[0].astype(int) - first[2].astype(int)).max() <= 1
    assert stain.fit_target(pale[None], method, 'pale tile') == target


def _slide_normalise(crops, target):
  """Normalise crops as one slide's patches, the slide's stain pooled from all of them."""
  norm = stain.Normaliser(target, scope='slide')
  images = torch.from_numpy(np.ascontiguousarray(crops))
  own = norm.start_slide([stain.estimate(images, target.method)])
  return norm(images).numpy(), norm.pop_fallbacks(), own


def test_slide_scope_keeps_the_differences_between_a_slides_patches(tiles):
  """Two crops of one tile, one with its hematoxylin doubled (hyperchromatic nuclei): per
  patch, Macenko maps both to the target's concentrations and the difference is lost; per
  slide, both get the slide's one mapping and the darker crop stays darker."""
  strong, pale = tiles
  target = stain.fit_target(pale[None], 'macenko', 'pale tile')
  crop = strong[:256, :256]
  od = -np.log((crop.astype(np.float64) + 1) / 240)
  he = np.array(stain.fit_target(crop[None], 'macenko', 'crop').values['stain_vectors']).T
  conc = od.reshape(-1, 3) @ np.linalg.pinv(he).T
  conc[:, 0] *= 2.0
  dark = np.clip(240 * np.exp(-(conc @ he.T)) - 1, 0, 255).round().astype(np.uint8)
  crops = np.stack([crop, dark.reshape(crop.shape)])

  def dark_over_plain(images, stains):  # ratio of the mean H concentrations of the two crops
    o = -np.log((images.reshape(len(images), -1, 3).astype(np.float64) + 1) / 240)
    h = (o @ np.linalg.pinv(stains).T)[..., 0].mean(1)
    return h[1] / h[0]

  per_patch, _ = stain.normalise_numpy(crops, target)
  per_slide, fallbacks, own = _slide_normalise(crops, target)
  assert fallbacks == 0 and len(own['stain_vectors']) == 2
  tgt = np.array(target.values['stain_vectors']).T
  ratio_before = dark_over_plain(crops, he)
  ratio_patch = dark_over_plain(per_patch, tgt)
  ratio_slide = dark_over_plain(per_slide, tgt)
  assert ratio_before > 2.0  # measured 2.33
  assert ratio_patch < 1.3, ratio_patch  # per patch: mostly gone (1.20)
  assert abs(ratio_slide / ratio_before - 1) < 0.1, ratio_slide  # per slide: kept (2.27)
  # ... and the slide as a whole takes the target's stain (torchstain measures it).
  out_he, _ = _torchstain_macenko(per_slide[0])
  ref_he, _ = _torchstain_macenko(pale)
  assert (_angles(out_he, ref_he) < 5.0).all(), _angles(out_he, ref_he)


def test_slide_scope_maps_every_patch_and_falls_back_for_unestimable_slides(tiles):
  """One stain per slide: glass is mapped with the rest (Macenko leaves it glass) and no
  patch falls back alone; a slide with no stain to estimate keeps every pixel, counted."""
  strong, pale = tiles
  glass = np.full((64, 64, 3), 243, np.uint8)
  tissue = strong[:64, 100:164]
  for method in stain.STAIN_METHODS:
    target = stain.fit_target(pale[None], method, 'pale tile')
    out, fallbacks, own = _slide_normalise(np.stack([glass, tissue]), target)
    assert own is not None and fallbacks == 0, (method, fallbacks)
    assert not np.array_equal(out[1], tissue)
    if method == 'macenko':  # optical density ~0 stays ~0 (measured: 3 grey levels)
      assert np.abs(out[0].astype(int) - 243).max() <= 5
    out, fallbacks, own = _slide_normalise(np.stack([glass, glass]), target)
    assert own is None and fallbacks == 2
    np.testing.assert_array_equal(out, np.stack([glass, glass]))
  with pytest.raises(RuntimeError, match='start_slide or use_stain'):
    stain.Normaliser(target, scope='slide')(torch.from_numpy(tissue[None].copy()))


def test_reinhard_per_center_looks_colours_up_in_a_table_equal_to_the_direct_mapping(tiles):
  """The center's colour table gives every pixel exactly what mapping it directly from the
  center's stain does, counts its patches, and is made once for the center's slides."""
  strong, pale = tiles
  target = stain.fit_target(pale[None], 'reinhard', 'pale tile')
  own = stain.fit_target(strong[None], 'reinhard', 'center B')
  x = torch.from_numpy(np.stack([strong[:128, :128], strong[128:256, :128]]))
  per_center = stain.Normaliser(target, scope='center')
  per_center.use_stain(own)
  table = per_center._source['table']
  direct = stain.Normaliser(target, scope='slide')
  direct.use_stain(own)
  assert 'table' not in direct._source
  out = per_center(x)
  np.testing.assert_array_equal(out.numpy(), direct(x).numpy())
  assert not np.array_equal(out.numpy(), x.numpy())
  assert per_center.patches == 2 and per_center.pop_fallbacks() == 0
  per_center.use_stain(own)  # the next slide of the same center
  assert per_center._source['table'] is table


@pytest.mark.parametrize('direction', ['strong_to_pale', 'pale_to_strong'])
def test_real_tiles_normalised_to_each_other_take_the_others_stain(tiles, direction):
  """Measured with torchstain's numpy Macenko, not this code: the stain vectors within 5
  degrees of the reference tile's, the 99th-percentile concentrations within 15%."""
  strong, pale = tiles
  source, reference = (strong, pale) if direction == 'strong_to_pale' else (pale, strong)
  target = stain.fit_target(reference[None], 'macenko', 'reference tile')
  out, fallbacks = stain.normalise_numpy(source[None], target)
  assert fallbacks == 0
  ref_he, ref_c = _torchstain_macenko(reference)
  src_he, src_c = _torchstain_macenko(source)
  out_he, out_c = _torchstain_macenko(out[0])
  after = _angles(out_he, ref_he)
  assert (after < 5.0).all(), after
  assert np.abs(out_c / ref_c - 1).max() < 0.15, (out_c, ref_c)
  assert np.abs(src_c / ref_c - 1).max() > 0.3  # before: far apart, so the check can fail
  assert _angles(src_he, ref_he).max() > 5.0


def test_tissue_mask_of_the_real_slide_is_unchanged(shared_data, tmp_path):
  """The patch grid is laid on the raw slide, so normalisation changes no patch's place;
  the mask of the normalised thumbnail itself agrees with the raw one (measured IoU)."""
  path = shared_data / 'cmu-1-small-region.svs'
  slide = slides.open_slide(path)
  tissue = slides.TissueParams()
  plan = slides.plan_patches(slide, target_mpp=2.0, patch_px=64, tissue=tissue)
  thumb = slides.read_rgb(slide, (0, 0), 0, slide.dimensions)
  slide.close()
  small = thumb[::8, ::8].copy()
  target = stain.fit_target(small[None], 'macenko', 'slide')
  norm, fallbacks = stain.normalise_numpy(small[None], target)
  assert fallbacks == 0 and not np.array_equal(norm, small[None])
  area = (64 * 2.0 / 0.499 / 8) ** 2
  raw_mask = slides.tissue_mask(small, tissue, patch_area_px=area)
  norm_mask = slides.tissue_mask(norm[0], tissue, patch_area_px=area)
  iou = (raw_mask & norm_mask).sum() / (raw_mask | norm_mask).sum()
  assert iou > 0.95, iou

  from feature_store import encoders

  cfg = tiny_extraction.config(target_mpp=2.0, tissue=tissue)
  enc = encoders.Encoder('wsi', 'random', name=cfg.wsi_encoder, kwargs=cfg.encoder_kwargs)
  norm = stain.Normaliser(target)
  bags = {}
  for name, normaliser in (('raw', None), ('macenko', norm)):
    extract.extract_slide(path, name, 'P1', tmp_path, enc, cfg, {}, name, normaliser=normaliser)
    bags[name] = store.read_slide(store.wsi_path(tmp_path, name))
  np.testing.assert_array_equal(bags['raw'].xy, bags['macenko'].xy)
  assert len(bags['raw'].xy) == len(plan.xy) > 10
  assert not np.allclose(bags['raw'].embeddings, bags['macenko'].embeddings)
  assert bags['macenko'].metadata['stain']['fallback_patches'] <= len(plan.xy)
  assert 'stain' not in bags['raw'].metadata


# --------------------------------------------------------------------------- the store

CFG = tiny_extraction.config(batch_size=32)


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  return tiny_extraction.manifest_with_mri(
    tmp_path_factory.mktemp('stain_cohort'), patients=6, seed=3
  )


def _wsi(store_dir):
  return store.read_store_json(store_dir)['wsi']


def test_stain_settings_in_the_fingerprint_and_a_change_re_extracts_slides_only(
  cohort, tmp_path, shared_data
):
  out = tmp_path / 'store'
  plain = extract.extract(cohort, out, CFG)
  assert plain.finalised and plain.failed == 0 and plain.mri_done == 1
  assert 'stain' not in _wsi(out)['fingerprint']  # stores made before keep their fingerprint
  shas = {'none': _wsi(out)['fingerprint_sha256']}

  mac = dataclasses.replace(CFG, stain_norm='macenko')
  with pytest.raises(extract.FingerprintMismatch, match='another fingerprint'):
    extract.extract(cohort, out, mac)
  done = extract.extract(cohort, out, dataclasses.replace(mac, overwrite=True))
  assert done.slides_done == plain.slides_done and done.slides_skipped == 0
  assert done.mri_done == 0 and done.mri_skipped == 1  # MRI is not extracted again
  fp = _wsi(out)['fingerprint']['stain']
  assert fp['method'] == 'macenko' and fp['source'].startswith('fitted on center(s) A:')
  assert len(fp['target']['stain_vectors']) == 2 and len(fp['target']['max_concentrations']) == 2
  shas['macenko'] = _wsi(out)['fingerprint_sha256']
  record = store.table_metadata(store.slide_files(out)[0])['stain']
  assert record['method'] == 'macenko' and record['target'] == fp['target']
  assert record['source'] == fp['source'] and isinstance(record['fallback_patches'], int)

  again = extract.extract(cohort, out, mac)  # same settings: the fitted target is reused
  assert again.slides_done == 0 and again.slides_skipped == plain.slides_done

  for name, cfg in (
    ('reinhard', dataclasses.replace(CFG, stain_norm='reinhard', overwrite=True)),
    (
      'reference',
      dataclasses.replace(
        mac, overwrite=True, stain_reference=str(shared_data / 'he_tile_pale.png')
      ),
    ),
    ('slide scope', dataclasses.replace(mac, overwrite=True, stain_scope='slide')),
    ('center scope', dataclasses.replace(mac, overwrite=True, stain_scope='center')),
    ('center B', dataclasses.replace(mac, overwrite=True, stain_fit_centers=('B',))),
  ):
    extract.extract(cohort, out, cfg)
    shas[name] = _wsi(out)['fingerprint_sha256']
    if name.endswith('scope'):  # each slide's record says which stain it was mapped from
      record = store.table_metadata(store.slide_files(out)[0])['stain']
      assert record['scope'] == name.split()[0]
      assert len(record['source_stain']['stain_vectors']) == 2
    if name == 'center scope':  # one stain per hospital; the development center's is the target
      sources = {
        json.dumps(store.table_metadata(p)['stain']['source_stain'], sort_keys=True)
        for p in store.slide_files(out)
      }
      target = json.dumps(_wsi(out)['fingerprint']['stain']['target'], sort_keys=True)
      assert len(sources) == 2 and target in sources
  assert len(set(shas.values())) == len(shas), shas  # every change changes the fingerprint
  assert _wsi(out)['fingerprint']['stain']['source'].startswith('fitted on center(s) B:')

  # launch.predict's config reproduces the store's stain target exactly.
  from moemil_jax import bundle, predict

  trained = bundle.store_fingerprint(out)
  cfg = predict.extraction_config({'trained_on': trained})
  assert cfg.stain_norm == 'macenko' and cfg.stain_target == trained['wsi']['stain']
  assert cfg.stain_scope == 'patch'


def test_bad_stain_settings_are_one_line_errors(cohort, tmp_path):
  with pytest.raises(stain.StainError, match='stain_reference needs'):
    extract.extract(cohort, tmp_path / 'a', dataclasses.replace(CFG, stain_reference='x.png'))
  bad = dataclasses.replace(CFG, stain_norm='macenko', stain_reference=str(tmp_path / 'no.png'))
  with pytest.raises(stain.StainError, match='no such file'):
    extract.extract(cohort, tmp_path / 'b', bad)
  blank = tmp_path / 'blank.png'
  import cv2

  cv2.imwrite(str(blank), np.full((64, 64, 3), 245, np.uint8))
  with pytest.raises(stain.StainError, match='too little tissue'):
    extract.extract(cohort, tmp_path / 'c', dataclasses.replace(bad, stain_reference=str(blank)))
  with pytest.raises(stain.StainError, match='not a center'):
    extract.extract(
      cohort,
      tmp_path / 'd',
      dataclasses.replace(CFG, stain_norm='macenko', stain_fit_centers=('Z',)),
    )


def test_shards_fit_the_same_target_and_assemble_the_store(cohort, tmp_path):
  """Each shard fits the default target itself, before any STORE.json exists: the fit is
  deterministic, so the shards agree and the store assembles."""
  out = tmp_path / 'sharded'
  cfg = dataclasses.replace(CFG, stain_norm='macenko', shard_count=2)
  first = extract.extract(cohort, out, dataclasses.replace(cfg, shard_index=0))
  assert not first.finalised
  second = extract.extract(cohort, out, dataclasses.replace(cfg, shard_index=1))
  assert second.finalised and first.slides_done and second.slides_done
  targets = {
    json.dumps(store.table_metadata(p)['stain']['target'], sort_keys=True)
    for p in store.slide_files(out)
  }
  assert len(targets) == 1
  assert json.loads(targets.pop()) == _wsi(out)['fingerprint']['stain']['target']
