"""Shipped data files (installed as the package `cosmos.weights`, read with importlib.resources): the CLIP BPE
merges and the tiny COSMOS model trained on `cosmos synth` scenes. See README.md in this folder."""
