"""EDM v-prediction denoiser scalings and the training objective (spec §4)."""
