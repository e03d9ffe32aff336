"""The TorchServe adapter: handlers that map the serving core (../../serving/) onto TorchServe's
BaseHandler hooks."""
