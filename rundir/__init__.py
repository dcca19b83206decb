"""The run directory: its layout, its records, its artifacts and manifest, and their integrity.

A package of its own below the pipeline and beside the compression floor: it names every file of a
run (:mod:`rundir.layout`), reads the stages' records typed (:mod:`rundir.records`, with the one
"final model" rule), writes JSON atomically and hashes artifacts (:mod:`rundir.artifacts`) and checks
the manifest (:mod:`rundir.integrity`). It reads no model files and imports no torch.
"""
