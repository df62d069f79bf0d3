"""Stable Diffusion 3 with composable concept erasures, loadable as a diffusers custom pipeline (docs/design.md §3).

    from diffusers import DiffusionPipeline
    from erasekit.pipelines import custom_pipeline_path

    pipe = DiffusionPipeline.from_pretrained(
        "stabilityai/stable-diffusion-3-medium-diffusers", text_encoder_3=None, tokenizer_3=None,
        custom_pipeline=custom_pipeline_path("erasekit_sd3"), trust_remote_code=True)  # this file's folder
    pipe.load_erasure("vangogh.uce.safetensors", name="vangogh")      # deltas on pipe.transformer
    image = pipe("a starry night over a village").images[0]
    with pipe.erasures_disabled():                   # the base model, restored on exit
        base = pipe("a starry night over a village").images[0]
    pipe.unload_erasures()                           # bitwise back to the base model

The file ships inside the package as data (``custom_pipeline_path("erasekit_sd3")`` is its folder; a repository
checkout's ``pipelines/erasekit_sd3`` re-exports this class). diffusers copies this file alone into
``HF_MODULES_CACHE``, so it imports erasekit absolutely (erasekit must be installed) and defines exactly one
``DiffusionPipeline`` subclass outside diffusers (its base is reached through the module, so that
``find_pipeline_class`` sees only this one). The mechanics live in ``erasekit.compose``.
"""

import erasekit.pipelines


class ErasureStableDiffusion3Pipeline(erasekit.pipelines.ErasureStableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` + ``load_erasure`` / ``set_erasures`` / ``fuse_erasures`` / ``unfuse_erasures`` /
    ``unload_erasures`` / ``erasures`` / ``erasures_disabled`` (see ``erasekit.pipelines``)."""

    _erasure_loadable_modules = ["transformer", "text_encoder", "text_encoder_2"]
