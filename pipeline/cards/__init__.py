"""Data cards: Hugging Face README, Croissant JSON-LD and a static HTML site, from the published metadata."""
