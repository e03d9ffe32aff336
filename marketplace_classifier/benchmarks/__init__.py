"""Benchmarks and load: the served speed, the model's own speed, memory, soak, the work budget,
the hostile mixed run and the engines' comparison. Run each with `python -m benchmarks.<name>`."""
