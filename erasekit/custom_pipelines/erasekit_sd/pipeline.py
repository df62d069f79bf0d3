"""Stable Diffusion with composable concept erasures, loadable as a diffusers custom pipeline (docs/design.md §3).

    from diffusers import DiffusionPipeline
    from erasekit.pipelines import custom_pipeline_path

    pipe = DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",          # or erasekit.tinyworld.path()
        custom_pipeline=custom_pipeline_path(), trust_remote_code=True)   # this file's folder, absolute
    pipe.load_erasure("vangogh.uce.safetensors", name="vangogh")
    pipe.load_erasure("nudity.spm.safetensors", name="nudity")
    pipe.set_erasures(["vangogh", "nudity"], weights=[1.0, 0.8])
    image = pipe("a starry night over a village").images[0]
    with pipe.erasures_disabled():                   # the base model, restored on exit
        base = pipe("a starry night over a village").images[0]
    pipe.unload_erasures()                           # bitwise back to the base model

The file ships inside the package as data (``custom_pipeline_path()`` is its folder; a repository checkout's
``pipelines/erasekit_sd`` re-exports this class). diffusers copies this file alone into ``HF_MODULES_CACHE``, so it
imports erasekit absolutely (erasekit must be installed) and defines exactly one ``DiffusionPipeline`` subclass
outside diffusers (its base is reached through the module, so that ``find_pipeline_class`` sees only this one). The
mechanics live in ``erasekit.compose``.
"""

import erasekit.pipelines


class ErasureStableDiffusionPipeline(erasekit.pipelines.ErasureStableDiffusionPipeline):
    """``StableDiffusionPipeline`` + ``load_erasure`` / ``set_erasures`` / ``fuse_erasures`` / ``unfuse_erasures`` /
    ``unload_erasures`` / ``erasures`` / ``erasures_disabled`` (see ``erasekit.pipelines``)."""

    _erasure_loadable_modules = ["unet", "text_encoder"]
