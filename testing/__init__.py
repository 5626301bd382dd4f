"""Scaffolding shared by the demo, the tests and the benchmarks: small random-weight models built from
mlx-lm's own classes, local node processes, and an in-process node link. The product's own paths never
import it; the demo command does."""
