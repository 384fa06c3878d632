"""Past one process on torch.distributed: the world (``World``), sharded state (FSDP2) and the
block pipeline."""
