"""Plumbing shared by the scripts: run folder and checkpoints, options and defaults, JSON reading, data sets,
wandb, torchrun, memory layout, plots. Nothing here is the algorithm; nothing here imports it."""
