"""Region proposer plugins (filled by the embedding engine)."""
