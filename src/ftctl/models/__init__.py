"""Layer 1: resolving (builtin:, folder, hub) and loading models and tokenizers; the tiny test models."""
