"""The second engine: KServe's model server with Ray Serve batching, over the serving core."""
