"""Layer 8: after training: merge, quantize, generate and chat."""
