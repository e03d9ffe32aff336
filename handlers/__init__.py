"""TorchServe handlers and the pre/post-processing they share with training."""
