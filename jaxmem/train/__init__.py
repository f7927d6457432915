"""Training: masks, augmentation, optimiser, the per-model step, its ensemble form, the run loop."""
