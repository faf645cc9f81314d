"""The front-end side of the engine: what gRPC, HTTP and the offline `LLM` share
(`EngineClient`, request validation, output processing)."""
