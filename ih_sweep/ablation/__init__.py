"""Head ablation: the hook (:mod:`.hooks`), the registry of methods (:mod:`.registry`), the
built-in methods (one module each), their fills (:mod:`.means`, :mod:`.donors`).

Importing the package registers the built-in methods, in the order errors list them; a new
method's module is added to :data:`BUILTIN` (or imported by whoever uses it)."""

from importlib import import_module

BUILTIN = ("zero", "mean", "position_mean", "resample", "knockout")

for _name in BUILTIN:
    import_module(f"ih_sweep.ablation.{_name}")
