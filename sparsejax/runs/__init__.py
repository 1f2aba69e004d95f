"""What a training run is made of, whatever it trains: the run and its loop
(:mod:`sparsejax.runs.run`), its folder (:mod:`~sparsejax.runs.run_dir`), verified
checkpoints (:mod:`~sparsejax.runs.checkpoint`, :mod:`~sparsejax.runs.fingerprint`),
stop signals (:mod:`~sparsejax.runs.signals`), metric writers
(:mod:`~sparsejax.runs.metric_writers`) and reports (:mod:`~sparsejax.runs.reporting`)."""
