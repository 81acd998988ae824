"""Task vectors and merging (task arithmetic, TIES, DARE, instruction vectors) and export."""
