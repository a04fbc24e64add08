"""Dataset contract and Grain loaders."""
