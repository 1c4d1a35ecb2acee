"""LightningModules: the training systems around the plain models of `lm_moe.models`."""
