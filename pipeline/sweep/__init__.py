"""Sweeps: settings x seeds, each cell a nested run of the ordinary pipeline, summarised over seeds.

==================  ==============================================================================
``cells``           cell folders (one slug), content-hash keys, keyed JSON records, finished cells
                    (light: the frontier keys its measurements with it)
``engine``          the sweep description, the cache-and-run primitive, the summary over seeds,
                    paired verdicts, the Markdown writer and ``summary.{json,md,png}``
``ablation``        the method ablation (``compress-deploy ablate``)
``distillation``    the distillation sweep (``compress-deploy ablate --distill``)
==================  ==============================================================================

This ``__init__`` imports nothing, so importing the light ``cells`` starts no pipeline.
"""
