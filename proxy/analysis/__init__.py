"""SQL analysis: the schema snapshot, statement analysis, rewrite and verdict cache."""
