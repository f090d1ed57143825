"""Training loop pieces used by launch/train.py: models, data, checkpoints, logging."""
