"""The serving core, free of any engine: request formats, limits, the work budget, batching of
listings through an exported model, answers and refusals. Training shares its preprocessing."""
