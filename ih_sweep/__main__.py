"""``python -m ih_sweep``: the Hydra app (see conf/config.yaml)."""

from ih_sweep.launch import main

if __name__ == "__main__":
    main()
