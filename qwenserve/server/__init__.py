"""The gRPC front end: proto, servicer, engine bridge and Python client."""
