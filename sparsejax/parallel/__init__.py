"""Many devices and many processes: the run's mesh and layout rules
(:mod:`sparsejax.parallel.sharding`) and ``jax.distributed`` launches
(:mod:`sparsejax.parallel.distributed`)."""
