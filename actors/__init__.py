"""attnscope.actors: Ray actors (engine rank workers, the clustering actor)."""
