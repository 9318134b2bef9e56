"""Ensembles: several models of one architecture used as one.

- `predict.Ensemble`: the members' denoiser outputs averaged at every sampling (and validation)
  step, so several fine-tunes of one base sample and evaluate as one model.
- `merge`: their weights averaged into one model (uniform, weighted, or a greedy soup that
  takes a member only where the validation loss improves), and LoRAs summed into their base or
  into one LoRA of a chosen rank.
- `members`: what a member may be (a run, a checkpoint, an exported model, a LoRA folder).
- `runs`: `sdtune train --ensemble N`, N members that differ only in seed, their soup and the
  ensemble's evaluation.
"""
