"""The study's own code: corpus, model suite, experiments, plots and the notebook pipeline."""
