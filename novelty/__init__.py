"""novelty: choose which unlabeled images to label next."""
