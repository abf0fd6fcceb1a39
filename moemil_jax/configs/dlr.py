"""Deep-learning radiomics baseline: the MoEMIL code with MRI only (radiomics + deep)."""

from moemil_jax.configs import moemil


def get_config():
  c = moemil.get_config()
  c.name = 'dlr'
  c.model.modalities = ('radiomics', 'mri_deep')
  c.loss.instance = 0.0
  c.data.slide_prototypes = 0  # no slides
  return c
