"""Pathomics baseline: the MoEMIL code with the WSI branch only."""

from moemil_jax.configs import moemil


def get_config():
  c = moemil.get_config()
  c.name = 'pathomics'
  c.model.modalities = ('wsi',)
  c.model.modality_dropout = 0.0
  return c
