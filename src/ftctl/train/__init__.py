"""Layer 8: the training recipe (loop.py), the engines for one or many processes (distributed.py),
checkpoints, the optimizer, the torchrun launcher and the experiment trackers."""
