"""Fast text kernels shared by stages: conversation text, shingles, MinHash + LSH, n-gram indexes."""
