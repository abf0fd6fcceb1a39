"""The feature store on disk: Parquet tables plus STORE.json (see DESIGN.md).

One module owns the layout so that extraction (writer), the synthetic store
generator (writer) and training (reader) cannot drift apart. Every write goes to
a temporary name and is renamed into place, so a file present is a file
complete; files get the permissions the process umask allows (a store on a
shared disk stays readable by colleagues).

Schema 2 stores slide embeddings as one `fixed_size_binary` value per patch
(float16 bytes, dtype in the field metadata), uncompressed and without a
dictionary: it decodes to numpy without a copy, about 5x faster than schema 1's
dictionary-encoded `fixed_size_list<float16>` (moemil_jax/bench/store_format.py).
Schema 1 stores still load; `upgrade_store` converts them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
WSI_DIM = 1024
MRI_DEEP_DIM = 2048
STORE_JSON = 'STORE.json'
CLINICAL = 'clinical.parquet'
RADIOMICS = 'mri_radiomics.parquet'
MRI_DEEP = 'mri_deep.parquet'
FAILURES = 'failures.parquet'
WSI_DIR = 'wsi'
_META_KEY = b'moemil'

# Manifest / clinical columns. The names carry from manifest.csv to clinical.parquet.
CLINICAL_COLUMNS = (
  'patient_id',
  'center',
  'age',
  'sex',
  'ebv_dna',
  't_stage',
  'n_stage',
  'overall_stage',
  'ic_response',
  'os_months',
  'os_event',
)
MRI_SEQUENCES = ('t1', 't2', 't1c')

_SAFE_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')


class StoreError(ValueError):
  """A store file is missing, corrupt, or inconsistent; the message names it."""


def validate_id(value: str, *, what: str = 'id') -> str:
  """Returns `value` if it is safe as a file name (no '/', no '..', no spaces)."""
  if not isinstance(value, str) or not _SAFE_ID.match(value) or '..' in value:
    raise ValueError(
      f"{what} {value!r} is not a safe identifier: use letters, digits, '.', '_' "
      "or '-' (at most 128, not starting with '.' and without '..')"
    )
  return value


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
  with _UMASK_LOCK:  # os.umask can only be read by setting it
    mask = os.umask(0o022)
    os.umask(mask)
  return mask


def _mkstemp(path: Path) -> tuple[int, str]:
  """mkstemp (mode 0600) widened to what the umask allows, as open(path, 'w') would be."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  os.fchmod(fd, 0o666 & ~_umask())
  return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
  path = Path(path)
  fd, tmp = _mkstemp(path)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def atomic_write_table(table: pa.Table, path: Path, *, compression: str = 'zstd') -> None:
  """Writes a Parquet file under a temporary name, fsyncs it and renames it into place.

  An `embedding` column (and the stain views' `embedding_view<k>`) is written uncompressed
  and without a dictionary (the fast layout; float embeddings neither repeat nor compress
  much), every other column with `compression`.
  """
  path = Path(path)
  fd, tmp = _mkstemp(path)
  os.close(fd)
  names = table.column_names
  plain = [n for n in names if not n.startswith('embedding')]
  try:
    pq.write_table(
      table,
      tmp,
      compression={n: (compression if n in plain else 'none') for n in names},
      use_dictionary=plain,
      write_statistics=plain,
    )
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _with_meta(schema: pa.Schema, meta: Mapping[str, Any] | None) -> pa.Schema:
  if not meta:
    return schema
  return schema.with_metadata({_META_KEY: json.dumps(meta, sort_keys=True).encode()})


def table_metadata(path: Path) -> dict[str, Any]:
  """The JSON metadata this store attached to a Parquet file (empty if none)."""
  try:
    md = pq.read_schema(path).metadata or {}
  except (OSError, pa.ArrowInvalid) as e:
    raise StoreError(f'{path}: unreadable Parquet file ({e})') from e
  return json.loads(md[_META_KEY]) if _META_KEY in md else {}


def embeddings_array(emb: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
  """(n, d) -> fixed_size_list<dtype> (the small MRI tables; slides use `binary_embeddings`)."""
  emb = np.ascontiguousarray(emb)
  if emb.ndim != 2:
    raise ValueError(f'embeddings must be 2-D, got shape {emb.shape}')
  flat = pa.array(emb.reshape(-1).astype(dtype.to_pandas_dtype(), copy=False), type=dtype)
  return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])


EMB_DTYPE_KEY = b'moemil_dtype'


def binary_embeddings(emb: np.ndarray) -> pa.FixedSizeBinaryArray:
  """(n, d) -> fixed_size_binary(d * itemsize): one value per row, no copy of the bytes."""
  emb = np.ascontiguousarray(emb)
  if emb.ndim != 2:
    raise ValueError(f'embeddings must be 2-D, got shape {emb.shape}')
  width = emb.shape[1] * emb.itemsize
  return pa.Array.from_buffers(
    pa.binary(width), len(emb), [None, pa.py_buffer(emb.reshape(-1).view(np.uint8))]
  )


def embedding_field(emb: np.ndarray, name: str = 'embedding') -> pa.Field:
  return pa.field(
    name,
    pa.binary(emb.shape[1] * emb.itemsize),
    nullable=False,
    metadata={EMB_DTYPE_KEY: np.dtype(emb.dtype).name.encode()},
  )


def embeddings_from_column(
  col: pa.ChunkedArray | pa.Array, path: Path | str = '', dtype: Any = np.float16
) -> np.ndarray:
  """Embedding column -> (n, d) numpy array.

  fixed_size_binary (schema 2 slides; `dtype` says how to read the bytes): a read-only view
  of the Arrow buffer, no copy. fixed_size_list (schema 1, MRI tables): one flat conversion.
  """
  if isinstance(col, pa.ChunkedArray):
    col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
  if pa.types.is_fixed_size_binary(col.type):
    dtype = np.dtype(dtype)
    width = col.type.byte_width
    if width % dtype.itemsize or col.null_count:
      raise StoreError(f'{path}: embedding column {col.type} does not hold {dtype} rows')
    d = width // dtype.itemsize
    flat = np.frombuffer(col.buffers()[1], dtype, count=len(col) * d, offset=col.offset * width)
    return flat.reshape(len(col), d)
  if not pa.types.is_fixed_size_list(col.type):
    raise StoreError(
      f'{path}: embedding column has type {col.type}, expected fixed_size_binary or fixed_size_list'
    )
  d = col.type.list_size
  values = col.values
  if col.offset:
    values = values.slice(col.offset * d, len(col) * d)
  return values.to_numpy(zero_copy_only=False).reshape(len(col), d)


def read_embeddings(table: pa.Table, path: Path | str = '') -> np.ndarray:
  """The table's embedding column as (n, d), the dtype taken from the field's metadata."""
  field = table.schema.field('embedding')
  dtype = (field.metadata or {}).get(EMB_DTYPE_KEY, b'float16').decode()
  return embeddings_from_column(table.column('embedding'), path, dtype)


# --------------------------------------------------------------------------- WSI


# Stain augmentation (docs/stain.md): view k (1-based) of every patch, the embedding of a
# HED-jittered copy of it, is the column `embedding_view<k>` of the slide file, beside
# `embedding` (the original, view 0); readers that do not ask for views never decode them.
VIEW_COLUMN = 'embedding_view{}'


def wsi_path(store: Path, slide_id: str) -> Path:
  return Path(store) / WSI_DIR / f'{validate_id(slide_id, what="slide_id")}.parquet'


def write_slide(
  store: Path,
  slide_id: str,
  patient_id: str,
  xy: np.ndarray,
  embeddings: np.ndarray,
  metadata: Mapping[str, Any],
  views: np.ndarray | None = None,
) -> Path:
  """Writes wsi/<slide_id>.parquet: coordinates (level-0 px) and float16 embeddings.

  views: (K, n, d) embeddings of K stain-augmented views of every patch, written as the
  columns embedding_view1..K (VIEW_COLUMN)."""
  validate_id(patient_id, what='patient_id')
  xy = np.asarray(xy)
  if xy.shape != (len(embeddings), 2):
    raise ValueError(f'slide {slide_id}: {len(embeddings)} embeddings but xy shape {xy.shape}')
  n = len(embeddings)
  emb = np.ascontiguousarray(embeddings, np.float16)
  if emb.ndim != 2:
    raise ValueError(f'slide {slide_id}: embeddings must be 2-D, got shape {emb.shape}')
  schema = pa.schema(
    [
      ('slide_id', pa.string()),
      ('patient_id', pa.string()),
      ('x', pa.int32()),
      ('y', pa.int32()),
      embedding_field(emb),
    ]
  )
  # The patient and row count in the footer let a reader plan without decoding a column.
  meta = {**dict(metadata), 'slide_id': slide_id, 'patient_id': patient_id}
  table = pa.Table.from_arrays(
    [
      pa.array([slide_id] * n, pa.string()),
      pa.array([patient_id] * n, pa.string()),
      pa.array(xy[:, 0].astype(np.int32)),
      pa.array(xy[:, 1].astype(np.int32)),
      binary_embeddings(emb),
    ],
    schema=_with_meta(schema, meta),
  )
  for k, view in enumerate([] if views is None else views, start=1):
    view = np.ascontiguousarray(view, np.float16)
    if view.shape != emb.shape:
      raise ValueError(f'slide {slide_id}: stain view {k} has shape {view.shape}, not {emb.shape}')
    table = table.append_column(
      embedding_field(view, VIEW_COLUMN.format(k)), binary_embeddings(view)
    )
  path = wsi_path(store, slide_id)
  atomic_write_table(table, path)
  return path


@dataclasses.dataclass
class SlideBag:
  slide_id: str
  patient_id: str
  xy: np.ndarray  # (n, 2) int32, level-0 pixels
  embeddings: np.ndarray  # (n, d) float16
  metadata: dict[str, Any]


def slide_patient_and_rows(path: Path) -> tuple[str, int]:
  """(patient_id, patches) of a slide file from its footer and patient column only.

  Lets a process plan which bags it will hold without decoding any embedding.
  """
  path = Path(path)
  try:
    footer = pq.read_metadata(path)
    meta = (footer.metadata or {}).get(_META_KEY)
    if meta is not None:
      pid = json.loads(meta).get('patient_id')
      if isinstance(pid, str) and pid:
        return pid, footer.num_rows
    table = pq.read_table(path, columns=['patient_id'])
  except (OSError, pa.ArrowInvalid, KeyError) as e:
    raise StoreError(f'{path}: unreadable Parquet file or no patient_id column ({e})') from e
  return (table.column('patient_id')[0].as_py() if len(table) else '', len(table))


def read_slide(path: Path, *, expected_dim: int | None = None) -> SlideBag:
  path = Path(path)
  try:
    table = pq.read_table(path)
  except (OSError, pa.ArrowInvalid) as e:
    raise StoreError(f'{path}: unreadable Parquet file ({e})') from e
  missing = {'slide_id', 'patient_id', 'x', 'y', 'embedding'} - set(table.column_names)
  if missing:
    raise StoreError(f'{path}: missing columns {sorted(missing)}')
  emb = read_embeddings(table, path)
  if expected_dim is not None and emb.shape[1] != expected_dim:
    raise StoreError(f'{path}: embedding width {emb.shape[1]}, store expects {expected_dim}')
  meta = table.schema.metadata or {}
  slide_ids = table.column('slide_id')
  patient_ids = table.column('patient_id')
  return SlideBag(
    slide_id=slide_ids[0].as_py() if len(table) else path.stem,
    patient_id=patient_ids[0].as_py() if len(table) else '',
    xy=np.stack([table.column('x').to_numpy(), table.column('y').to_numpy()], 1).astype(np.int32),
    embeddings=emb,
    metadata=json.loads(meta[_META_KEY]) if _META_KEY in meta else {},
  )


def read_slide_embeddings(
  path: Path, *, expected_dim: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
  """(embeddings (n, d), metadata) of a slide file: the embedding column alone, decoded
  by pyarrow's own threads; the fast path of `load_store`."""
  try:
    pf = pq.ParquetFile(path)
    table = pf.read(columns=['embedding'])
  except (OSError, pa.ArrowInvalid, KeyError) as e:
    raise StoreError(f'{path}: unreadable Parquet file or no embedding column ({e})') from e
  emb = read_embeddings(table, path)
  if expected_dim is not None and emb.shape[1] != expected_dim:
    raise StoreError(f'{path}: embedding width {emb.shape[1]}, store expects {expected_dim}')
  meta = pf.schema_arrow.metadata or {}
  return emb, (json.loads(meta[_META_KEY]) if _META_KEY in meta else {})


def read_slide_views(path: Path, views: int, *, expected_dim: int | None = None) -> np.ndarray:
  """(views, n, d) float16: the stain views 1..views of a slide file's patches."""
  names = [VIEW_COLUMN.format(k) for k in range(1, views + 1)]
  try:
    pf = pq.ParquetFile(path)
    missing = [n for n in names if n not in pf.schema_arrow.names]
    if missing:
      raise StoreError(
        f'{path}: no column {missing[0]}: the slide holds fewer than {views} stain views; '
        f'extract it with --stain_augment={views} (or lower data.stain_views)'
      )
    table = pf.read(columns=names)
  except (OSError, pa.ArrowInvalid) as e:
    raise StoreError(f'{path}: unreadable Parquet file ({e})') from e
  arrays = []
  for n in names:
    field = table.schema.field(n)
    dtype = (field.metadata or {}).get(EMB_DTYPE_KEY, b'float16').decode()
    arrays.append(embeddings_from_column(table.column(n), path, dtype))
  out = np.stack(arrays) if arrays else np.zeros((0, table.num_rows, 0), np.float16)
  if expected_dim is not None and arrays and out.shape[2] != expected_dim:
    raise StoreError(f'{path}: embedding width {out.shape[2]}, store expects {expected_dim}')
  return out


# --------------------------------------------------------------------------- MRI


def write_radiomics(store: Path, rows: list[dict[str, Any]], metadata: Mapping[str, Any]) -> Path:
  """rows: dicts with patient_id, sequence and one float per PyRadiomics feature."""
  features = sorted({k for r in rows for k in r} - {'patient_id', 'sequence'})
  cols: dict[str, pa.Array] = {
    'patient_id': pa.array([r['patient_id'] for r in rows], pa.string()),
    'sequence': pa.array([r['sequence'] for r in rows], pa.string()),
  }
  for f in features:
    cols[f] = pa.array([float(r.get(f, np.nan)) for r in rows], pa.float64())
  table = pa.table(cols)
  table = table.replace_schema_metadata(_with_meta(table.schema, dict(metadata)).metadata)
  path = Path(store) / RADIOMICS
  atomic_write_table(table, path)
  return path


def write_mri_deep(
  store: Path,
  patient_ids: Iterable[str],
  sequences: Iterable[str],
  slice_index: Iterable[int],
  embeddings: np.ndarray,
  metadata: Mapping[str, Any],
) -> Path:
  table = pa.table(
    {
      'patient_id': pa.array(list(patient_ids), pa.string()),
      'sequence': pa.array(list(sequences), pa.string()),
      'slice_index': pa.array(np.asarray(list(slice_index), np.int32)),
      'embedding': embeddings_array(np.asarray(embeddings, np.float32), pa.float32()),
    }
  )
  table = table.replace_schema_metadata(_with_meta(table.schema, dict(metadata)).metadata)
  path = Path(store) / MRI_DEEP
  atomic_write_table(table, path)
  return path


# --------------------------------------------------------------------------- clinical, failures, STORE.json


CLINICAL_SCHEMA = pa.schema(
  [
    ('patient_id', pa.string()),
    ('center', pa.string()),
    ('age', pa.float64()),
    ('sex', pa.string()),
    ('ebv_dna', pa.float64()),
    ('t_stage', pa.int8()),
    ('n_stage', pa.int8()),
    ('overall_stage', pa.string()),
    ('ic_response', pa.int8()),
    ('os_months', pa.float64()),
    ('os_event', pa.int8()),
    ('has_wsi', pa.bool_()),
    ('has_mri', pa.bool_()),
  ]
)


def clinical_table(frame) -> pa.Table:
  """A pandas frame with the manifest's clinical columns (+ has_wsi/has_mri) -> typed table.

  Missing values (NaN / None / empty) become nulls; ic_response may be null.
  """
  missing = [f.name for f in CLINICAL_SCHEMA if f.name not in frame.columns]
  if missing:
    raise ValueError(f'clinical table lacks columns {missing}')
  arrays = []
  for field in CLINICAL_SCHEMA:
    values = frame[field.name]
    mask = values.isna().to_numpy()
    if pa.types.is_integer(field.type):
      values = values.fillna(0).astype(np.int64)
    arrays.append(pa.array(values.to_numpy(), type=field.type, mask=mask, from_pandas=True))
  return pa.Table.from_arrays(arrays, schema=CLINICAL_SCHEMA)


def write_clinical(store: Path, table: pa.Table) -> Path:
  for pid in table.column('patient_id').to_pylist():
    validate_id(pid, what='patient_id')
  path = Path(store) / CLINICAL
  atomic_write_table(table, path)
  return path


def write_failures(store: Path, failures: list[dict[str, str]]) -> Path:
  table = pa.table(
    {
      'item': pa.array([f['item'] for f in failures], pa.string()),
      'stage': pa.array([f['stage'] for f in failures], pa.string()),
      'reason': pa.array([f['reason'] for f in failures], pa.string()),
    }
  )
  path = Path(store) / FAILURES
  atomic_write_table(table, path)
  return path


def write_store_json(store: Path, info: Mapping[str, Any]) -> Path:
  info = {'schema_version': SCHEMA_VERSION, **info}
  path = Path(store) / STORE_JSON
  atomic_write_bytes(path, (json.dumps(info, indent=2, sort_keys=True) + '\n').encode())
  return path


def read_store_json(store: Path) -> dict[str, Any]:
  path = Path(store) / STORE_JSON
  if not path.exists():
    raise StoreError(f'{path}: not found; is {store} a feature store?')
  info = json.loads(path.read_text())
  if info.get('schema_version') not in READABLE_SCHEMAS:
    raise StoreError(
      f'{path}: schema_version {info.get("schema_version")}, this code reads '
      f'{", ".join(map(str, READABLE_SCHEMAS))}'
    )
  return info


# --------------------------------------------------------------------------- fingerprints

# Fingerprint keys that record the environment a store was made in, not what its features
# are: the same encoder, weights, patching, tissue, stain and radiomics settings on a GPU in
# fp16 or a CPU in fp32, or under another library version, give features that differ by
# rounding (docs/stain.md, "Fingerprints"). A store that differs from a model's training
# store only in these is scored with one warning; any other difference is refused.
ENVIRONMENT_KEYS = frozenset(
  {'device_type', 'precision', 'torch', 'torchvision', 'timm', 'pyradiomics'}
)
# Fingerprint keys that add to a store without changing its features: the stain views of
# training (view 0, the embedding every model reads, is the same with or without them), so a
# model trained on an augmented store scores a store extracted without views.
TRAINING_ONLY_KEYS = frozenset({'stain_augment'})
# The parts of a store's fingerprint (moemil_jax.bundle.store_fingerprint) that are compared.
FINGERPRINT_PARTS = ('encoder', 'wsi', 'mri')


def split_fingerprint(fp: Any, path: str = '') -> tuple[Any, dict[str, Any]]:
  """(fp without its environment keys, {dotted path: value} of those keys), at any depth;
  TRAINING_ONLY_KEYS are left out of both."""
  if not isinstance(fp, Mapping):
    return fp, {}
  features, env = {}, {}
  for key in sorted(fp):
    where = f'{path}.{key}' if path else str(key)
    if key in ENVIRONMENT_KEYS:
      env[where] = fp[key]
      continue
    if key in TRAINING_ONLY_KEYS:
      continue
    features[key], inner = split_fingerprint(fp[key], where)
    env.update(inner)
  return features, env


def _first_difference(a: Any, b: Any, path: str) -> str | None:
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    for key in sorted(set(a) | set(b)):
      found = _first_difference(a.get(key), b.get(key), f'{path}.{key}' if path else key)
      if found:
        return found
    return None
  return None if a == b else f'{path}: {a!r} vs {b!r}'


def compare_fingerprints(
  trained: Mapping[str, Any], other: Mapping[str, Any]
) -> tuple[str | None, list[str]]:
  """(the first difference in what defines the features, as '<field>: <trained> vs
  <other>', or None; the environment differences, each '<field>: <trained> vs <other>').

  Compares FINGERPRINT_PARTS; stores without extraction fingerprints (synthetic) are
  compared by their fingerprint hashes too."""
  a_feat, a_env = split_fingerprint({k: trained.get(k) for k in FINGERPRINT_PARTS})
  b_feat, b_env = split_fingerprint({k: other.get(k) for k in FINGERPRINT_PARTS})
  found = _first_difference(a_feat, b_feat, '')
  if found is None and trained.get('wsi') is None and other.get('wsi') is None:
    keys = ('wsi_sha256', 'mri_sha256')
    found = _first_difference(
      {k: trained.get(k) for k in keys}, {k: other.get(k) for k in keys}, ''
    )
  env = [
    f'{k}: {a_env.get(k)!r} vs {b_env.get(k)!r}'
    for k in sorted(set(a_env) | set(b_env))
    if a_env.get(k) != b_env.get(k)
  ]
  return found, env


def upgrade_store(store: Path) -> int:
  """Rewrites a schema-1 store's slide files in the schema-2 layout, each atomically, then
  STORE.json; returns the files rewritten. Interrupted, it resumes: a converted file is
  skipped, and the store reads correctly at every point (both layouts load)."""
  store = Path(store)
  info = read_store_json(store)
  done = 0
  for path in slide_files(store):
    table = pq.read_table(path)
    if pa.types.is_fixed_size_binary(table.schema.field('embedding').type):
      continue
    emb = np.ascontiguousarray(read_embeddings(table, path), np.float16)
    i = table.schema.get_field_index('embedding')
    table = table.set_column(i, embedding_field(emb), binary_embeddings(emb))
    atomic_write_table(table, path)
    done += 1
  if info.get('schema_version') != SCHEMA_VERSION:
    write_store_json(store, {k: v for k, v in info.items() if k != 'schema_version'})
  return done


def slide_files(store: Path) -> list[Path]:
  return sorted((Path(store) / WSI_DIR).glob('*.parquet'))
