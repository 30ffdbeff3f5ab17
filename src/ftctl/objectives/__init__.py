"""Layer 4: the training objectives (sft, the DPO family, reward), registered by name with what each needs."""
