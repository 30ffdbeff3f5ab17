"""Layer 2: the schema, composition of configs/ + recipes/ + overrides, and validation."""
