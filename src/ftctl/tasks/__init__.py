"""Layer 5: what differs between tasks (causal generation, seq2seq, classification) behind one interface."""
