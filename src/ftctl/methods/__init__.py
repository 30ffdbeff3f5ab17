"""Layer 1: the adaptation methods (peft=NAME): how each wraps a model, and its traits."""
