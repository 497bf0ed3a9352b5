"""Loop machinery shared by every method: state, sharding, checkpoints, writers, the loop."""
