"""Training, evaluation and export of the marketplace classifiers."""
