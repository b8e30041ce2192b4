"""vmswarm.cli."""
