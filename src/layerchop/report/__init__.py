"""Paper tables and figures, generated only from metrics files."""
