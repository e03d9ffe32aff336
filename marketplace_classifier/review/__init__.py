"""Where flagged listings go: a review queue in a database (SQLite or PostgreSQL), the ingestion
of flagged answers, a review web app, and the export of decisions as training data."""
