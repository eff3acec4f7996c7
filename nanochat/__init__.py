"""nanochat: single-GPU GPT pretraining with feature-flagged, honestly measured speed-ups."""
