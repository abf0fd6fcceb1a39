"""Any model config plus `config.mesh` for data-parallel training (see moemil_jax/parallel.py).

  --config=launch/recipes/data_parallel.py:moemil   (or :dlr, :pathomics, :test)
  --config.mesh.data=-1 (all devices, default)  --config.mesh.distributed=True (multi-host)
"""

import importlib

from moemil_jax import parallel


def get_config(arg: str = "moemil"):
  config = importlib.import_module(f"moemil_jax.configs.{arg or 'moemil'}").get_config()
  config.mesh = parallel.mesh_config()
  config.mesh.data = -1
  return config
