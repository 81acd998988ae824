"""Merging: task vectors (`task_vectors`), per-tensor merge methods (`methods`: task arithmetic,
TIES, DARE) and the exact streaming LoRA merge into a sharded model folder (`streaming`)."""
