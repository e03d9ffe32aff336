"""One adapter per serving engine over the serving core: `torchserve` (TorchServe's handlers) and
`kserve_ray` (KServe's model server with Ray Serve batching)."""
