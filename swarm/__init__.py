"""vmswarm.swarm."""
