"""A tiny MoEMIL for tests and smoke runs on a CPU (small store, a few epochs)."""

from moemil_jax.configs import moemil


def get_config():
  c = moemil.get_config()
  c.data.max_train_patches = 128
  c.data.radiomics_lasso = False
  c.data.radiomics_top_k = 0  # the tiny test stores have few columns: keep them all
  # Both slide pathways, so that every test that trains or predicts also runs the prototype
  # one (the default) and the attention one (heatmaps, instance loss).
  c.model.wsi_pathway = 'both'
  c.model.wsi_hidden_dim = 64
  c.model.attention_dim = 32
  c.model.radiomics_hidden_dims = (32,)
  c.model.mri_deep_hidden_dim = 32
  c.model.expert_dim = 32
  c.model.tower_dim = 16
  c.model.dropout = 0.1
  c.train.batch_size = 8
  c.train.epochs = 12
  c.train.learning_rate = 3e-3
  c.train.warmup_epochs = 1
  c.train.patience = 0
  c.train.log_every = 5
  c.train.checkpoint_every = 1  # resume tests stop and kill runs between epochs
  c.train.ensemble = 0  # one model: most tests check single-model training
  # The synthetic stores' external center, named: library calls that take the config as it
  # is (sweep, ensemble) compare centers with it directly; launch tools resolve ''.
  c.split.test_center = 'B'
  return c
