"""Layer 5: the training objectives, registered by name (``objective=NAME``) with what each needs
(see ``spec.py``). Importing this package registers them: one line per objective."""
from ftctl.objectives import dpo, reward, sft  # noqa: F401  (each registers its spec)
