"""Training: which parameters train (optax masks); the train step and loop."""
