"""Merging: task vectors (`task_vectors`), per-tensor merge methods (`methods`: task arithmetic,
TIES, DARE), the exact streaming LoRA merge into a sharded model folder (`streaming`, `plan`),
SVD-truncated LoRA adapters (`svd`), instruction-vector merging (`instruction_vector`) and the
gain-vs-forgetting merge search (`search`)."""
