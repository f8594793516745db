"""ih_sweep's submitit launchers (Hydra requires plugins under the hydra_plugins namespace)."""
