# The Hydra config tree, importable as `train.conf` so `pip install .` ships it (pyproject maps it).
