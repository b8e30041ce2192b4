"""vmswarm.daemon."""
