"""The per-token divergence: the float64 reference, the chunked path and its per-chunk math, the loss reduction
and statistics over a whole step."""
