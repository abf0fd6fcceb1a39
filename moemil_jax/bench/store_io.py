"""P5: loading the store into training arrays against a raw read of the same Parquet files.

`p5_gbps` is `load_store`'s throughput in GB of slide embeddings (float16 payload) per second;
`ratio` puts it beside a plain single-threaded `pq.read_table` of every file.

`moemil_jax.data.load_store` validates, decodes float16 embeddings and concatenates every
patient's slides into one bag array; the floor is `pyarrow.parquet.read_table` of each file
with nothing else. Both run on a warm page cache, alternating, so the ratio is the cost of
our loading code, not of the disk. Bytes per patch counts the WSI files (the bulk) only:
float16 x 1024 is 2,048 bytes of payload, plus coordinates.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from absl import logging

from feature_store import store as store_lib
from moemil_jax import store_reader


def p5_regime(quick: bool):
  """404 patients as in the paper; bags of median 600 patches (about 0.6 GB of float16
  embeddings) keep the synthetic store CPU-friendly to write; quick: 40 patients."""
  from moemil_jax.bench import training

  if quick:
    return training.Regime('p5', 40, 300, 3000)
  return training.Regime('p5', 404, 600, 6000)


def _all_files(store_dir: Path) -> list[Path]:
  return sorted(Path(store_dir).rglob('*.parquet'))


def raw_read(store_dir: Path) -> int:
  """pq.read_table of every Parquet file; returns the number of bytes decoded."""
  return sum(pq.read_table(path).nbytes for path in _all_files(store_dir))


def run(store_dir: str | Path, *, repeats: int = 3) -> dict[str, Any]:
  store_dir = Path(store_dir)
  load_times, raw_times = [], []
  cohort = store_reader.load_store(store_dir)  # warms the page cache
  raw_read(store_dir)
  for _ in range(repeats):
    start = time.perf_counter()
    cohort = store_reader.load_store(store_dir)
    load_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    decoded = raw_read(store_dir)
    raw_times.append(time.perf_counter() - start)
  wsi_files = store_lib.slide_files(store_dir)
  wsi_bytes = sum(p.stat().st_size for p in wsi_files)
  total_bytes = sum(p.stat().st_size for p in _all_files(store_dir))
  patches = int(cohort.patch_count.sum())
  load_s, raw_s = statistics.median(load_times), statistics.median(raw_times)
  out = {
    'patients': int(cohort.num_patients),
    'slides': len(wsi_files),
    'patches': patches,
    'files': len(_all_files(store_dir)),
    'store_bytes': total_bytes,
    'decoded_bytes': int(decoded),
    'load_store_s': load_s,
    'raw_read_s': raw_s,
    'ratio': load_s / raw_s,
    'raw_read_mb_per_s': total_bytes / raw_s / 1e6,
    'bytes_per_patch': wsi_bytes / max(patches, 1),
    'payload_bytes_per_patch': 2 * cohort.patches.shape[1],
    'embedding_bytes': int(cohort.patches.nbytes),
    'p5_gbps': cohort.patches.nbytes / load_s / 1e9,
    'schema_version': store_lib.read_store_json(store_dir)['schema_version'],
  }
  logging.info('P5: %s', out)
  return out
