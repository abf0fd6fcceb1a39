"""Stable salted pseudonyms for patient IDs in everything the evaluation writes.

A report leaves the hospital (mailed to reviewers, attached to a submission); hospital IDs
must not. `pseudonym(id, salt)` is an HMAC-SHA256, so the same patient gets the same
pseudonym in every run with the same salt, and nobody without the salt can recompute or
reverse it. The salt comes from --pseudonym_salt, $MOEMIL_PSEUDONYM_SALT, or is created once
in <workdir>/.pseudonym_salt (keep the workdir in the hospital; share only the report files).
After writing, every text output is scanned for the original IDs (`find_ids`) so a future
code path that forgets to pseudonymise fails loudly instead of leaking.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from feature_store.store import atomic_write_bytes

SALT_ENV = 'MOEMIL_PSEUDONYM_SALT'
SALT_FILE = '.pseudonym_salt'
PREDICTIONS_COPY = 'predictions_pseudonymised.csv'
_DATA_URI = re.compile(rb'data:[a-z/+-]+;base64,[A-Za-z0-9+/=]+')


def pseudonym(patient_id: str, salt: str) -> str:
  digest = hmac.new(salt.encode(), str(patient_id).encode(), hashlib.sha256).hexdigest()
  return f'P-{digest[:16]}'


def salt_for(workdir: str | Path, salt: str | None = None) -> str:
  """The explicit salt, else $MOEMIL_PSEUDONYM_SALT, else one stored in the workdir."""
  if salt:
    return salt
  if os.environ.get(SALT_ENV):
    return os.environ[SALT_ENV]
  path = Path(workdir) / SALT_FILE
  if not path.exists():
    atomic_write_bytes(path, secrets.token_hex(32).encode())
  return path.read_text().strip()


def _replacer(ids: Iterable[str], salt: str):
  ids = sorted({str(i) for i in ids}, key=len, reverse=True)  # longest first: P12 before P1
  pattern = re.compile('|'.join(map(re.escape, ids))) if ids else None
  return lambda text: pattern.sub(lambda m: pseudonym(m.group(0), salt), text) if pattern else text


def _walk(node: Any, fix) -> Any:
  if isinstance(node, str):
    return fix(node)
  if isinstance(node, dict):
    return {_walk(k, fix): _walk(v, fix) for k, v in node.items()}
  if isinstance(node, (list, tuple)):
    return type(node)(_walk(v, fix) for v in node)
  return node


def pseudonymise_evaluation(ev, salt: str):
  """A copy of an evaluation.Evaluation with patient IDs replaced everywhere it holds them."""
  ids = {i for df in ev.predictions.values() for i in df['patient_id'].astype(str)}
  fix = _replacer(ids, salt)
  predictions = {}
  for name, df in ev.predictions.items():
    df = df.copy()
    df['patient_id'] = [pseudonym(i, salt) for i in df['patient_id'].astype(str)]
    predictions[name] = df
  return dataclasses.replace(ev, predictions=predictions, results=_walk(ev.results, fix))


def write_predictions_copy(ev, workdir: str | Path) -> Path:
  """All models' (already pseudonymised) per-patient predictions in one shareable CSV."""
  frame = pd.concat(
    [df.assign(model=name) for name, df in ev.predictions.items()], ignore_index=True
  )
  path = Path(workdir) / PREDICTIONS_COPY
  atomic_write_bytes(path, frame.to_csv(index=False).encode())
  return path


def find_ids(paths: Iterable[str | Path], ids: Iterable[str]) -> list[tuple[Path, str]]:
  """(file, id) for every original ID found in a written file (embedded images skipped)."""
  ids = [str(i).encode() for i in ids]
  found = []
  for path in map(Path, paths):
    if path.suffix.lower() == '.png':
      continue  # figures carry no per-patient text
    data = _DATA_URI.sub(b'', path.read_bytes())
    found += [(path, i.decode()) for i in ids if i in data]
  return found
