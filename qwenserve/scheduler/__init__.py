"""Request state, the waiting/running queues and the per-step token budget."""
