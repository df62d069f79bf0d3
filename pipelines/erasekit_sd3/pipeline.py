"""The repository checkout's entry to erasekit's SD3 diffusers custom pipeline:
``custom_pipeline="pipelines/erasekit_sd3"`` from the repository root.

The pipeline itself ships inside the package, ``erasekit/custom_pipelines/erasekit_sd3/pipeline.py``; from any
directory (and from a pip install, which has no ``pipelines/`` folder) pass
``custom_pipeline=erasekit.pipelines.custom_pipeline_path("erasekit_sd3")`` instead.
"""

from erasekit.custom_pipelines.erasekit_sd3.pipeline import ErasureStableDiffusion3Pipeline  # noqa: F401
