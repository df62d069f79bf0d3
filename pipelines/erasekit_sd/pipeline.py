"""The repository checkout's entry to erasekit's diffusers custom pipeline:
``custom_pipeline="pipelines/erasekit_sd"`` from the repository root.

The pipeline itself ships inside the package, ``erasekit/custom_pipelines/erasekit_sd/pipeline.py``; from any
directory (and from a pip install, which has no ``pipelines/`` folder) pass
``custom_pipeline=erasekit.pipelines.custom_pipeline_path()`` instead.
"""

from erasekit.custom_pipelines.erasekit_sd.pipeline import ErasureStableDiffusionPipeline  # noqa: F401
