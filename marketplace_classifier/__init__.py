"""marketplace-classifier: train, package and serve classifiers of second-hand marketplace
listings. Subpackages, lowest floor first: `serving` (the engine-free serving core), `training`,
`engines` (one adapter per engine: `torchserve`, `kserve_ray`), `ops` (archives, servers, proxy,
rollout, clients), `benchmarks`; `cli` is the one command over them. Importing this package
imports nothing else."""

__version__ = "0.1.0"
