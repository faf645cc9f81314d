"""Workers: device, weight shard, KV tensors, model runner, sampler and executors."""
