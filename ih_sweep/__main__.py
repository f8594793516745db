"""``python -m ih_sweep``: the Hydra app (see conf/config.yaml)."""

from ih_sweep.cli import command

if __name__ == "__main__":
    command()
