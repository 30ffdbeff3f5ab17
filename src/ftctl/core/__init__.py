"""Layer 0, imports nothing else of ftctl: errors, paths, the name registry, atomic writes, consoles, progress, memory."""
