"""MoEMIL at the paper's widths, one model: for large cohorts, and what the benchmarks time.

The default (configs/moemil.py) is sized for cohorts of a few hundred patients: a five-member
fold ensemble of a narrower model (BUILD.md, "Training recipe"). This is the paper's model.
"""

from moemil_jax.configs import moemil


def get_config():
  c = moemil.get_config()
  c.name = 'moemil'
  c.model.wsi_hidden_dim = 512
  c.model.attention_dim = 256
  c.model.radiomics_hidden_dims = (128, 64)
  c.model.mri_deep_hidden_dim = 256
  c.model.expert_dim = 128
  c.model.tower_dim = 64
  c.model.wide_survival = False  # the paper's model has no linear terms
  c.model.wide_response = False
  c.model.wsi_pathway = 'attention'  # the paper's CLAM branch
  c.data.slide_prototypes = 0
  c.train.epochs = 60
  c.train.learning_rate = 3e-4
  c.train.weight_decay = 0.01
  c.train.slide_lr_multiplier = 1.0  # the paper has one learning rate
  c.train.ensemble = 0
  return c
