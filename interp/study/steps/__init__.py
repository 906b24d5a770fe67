"""The two-hop study's steps, one module each, in pipeline order: world → experts → evaluate →
mechanisms → subspace → figures → report. Each ``run(run)`` reads upstream results from the
run directory and writes its own tables."""
