"""python -m circuits.tasks.assoc [NAME ...]: rewrite the committed assoc references (all, or those named)."""

import sys

import torch

from .experiments import write_references

torch.set_num_threads(1)
write_references(sys.argv[1:] or None)
