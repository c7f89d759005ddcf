"""Library behind the speedrun pipeline: one concept per module, stages/ stays thin."""
