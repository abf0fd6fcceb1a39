"""Which Parquet layout decodes embeddings fastest: the choice behind the store's v2 format.

python -m moemil_jax.bench.store_format [--rows=2000 --files=40 --dim=1024]

Writes the same float16 embeddings (a ReLU-like, mostly non-negative distribution, like a
trunk's pooled features) once per layout and reads them back into one (n, d) numpy array per
file, on a warm page cache. Reports MB of embeddings per second and bytes on disk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _column(emb: np.ndarray, kind: str) -> pa.Array:
  n, d = emb.shape
  if kind == 'list':
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), d)
  buf = pa.py_buffer(np.ascontiguousarray(emb).view(np.uint8))
  return pa.Array.from_buffers(pa.binary(d * emb.itemsize), n, [None, buf])


def _to_numpy(col: pa.ChunkedArray, kind: str, d: int) -> np.ndarray:
  arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
  if kind == 'list':
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), d)
  return np.frombuffer(arr.buffers()[1], np.float16, len(arr) * d).reshape(len(arr), d)


LAYOUTS = {
  # name: (column kind, dictionary on the embedding column?, compression)
  'list+dict+zstd (schema 1)': ('list', True, 'zstd'),
  'list+zstd': ('list', False, 'zstd'),
  'list+none': ('list', False, 'none'),
  'binary+dict+zstd': ('binary', True, 'zstd'),
  'binary+zstd': ('binary', False, 'zstd'),
  'binary+lz4': ('binary', False, 'lz4'),
  'binary+none': ('binary', False, 'none'),
}


def run(rows: int = 2000, files: int = 40, dim: int = 1024, repeats: int = 3) -> dict:
  rng = np.random.default_rng(0)
  embs = [np.maximum(rng.normal(0.2, 1.0, (rows, dim)), 0).astype(np.float16) for _ in range(files)]
  payload = sum(e.nbytes for e in embs)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, (kind, dictionary, compression) in LAYOUTS.items():
      paths = []
      for i, e in enumerate(embs):
        path = Path(tmp) / f'{i}.{kind}.{dictionary}.{compression}.parquet'
        pq.write_table(
          pa.table({'embedding': _column(e, kind)}),
          path,
          compression=compression,
          use_dictionary=dictionary,
        )
        paths.append(path)
      times = []
      for _ in range(repeats + 1):  # the first warms the page cache
        start = time.perf_counter()
        for path, e in zip(paths, embs):
          got = _to_numpy(pq.read_table(path).column('embedding'), kind, dim)
          assert got.shape == e.shape
        times.append(time.perf_counter() - start)
      assert np.array_equal(got, embs[-1])
      s = statistics.median(times[1:])
      out[name] = {
        'mb_per_s': payload / s / 1e6,
        'disk_bytes_over_payload': sum(p.stat().st_size for p in paths) / payload,
      }
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', type=int, default=2000)
  parser.add_argument('--files', type=int, default=40)
  parser.add_argument('--dim', type=int, default=1024)
  args = parser.parse_args()
  print('| layout | MB/s decoded to numpy | disk / payload |\n|---|---|---|')
  for name, r in run(args.rows, args.files, args.dim).items():
    print(f'| {name} | {r["mb_per_s"]:.0f} | {r["disk_bytes_over_payload"]:.2f} |')


if __name__ == '__main__':
  main()
