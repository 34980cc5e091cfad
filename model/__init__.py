"""The Text2Earth resolution-conditioned latent diffusion model: components, training and generation.

`from model import Text2EarthPipeline` (and `Text2EarthInpaintPipeline`) is resolved lazily, so importing
`model.config` (params validation, the CLI) does not pull in torch, diffusers and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.inpaint import Text2EarthInpaintPipeline
    from model.pipeline import Text2EarthPipeline

__all__ = ["Text2EarthInpaintPipeline", "Text2EarthPipeline"]


def __getattr__(name: str) -> Any:
    if name == "Text2EarthPipeline":
        from model.pipeline import Text2EarthPipeline

        return Text2EarthPipeline
    if name == "Text2EarthInpaintPipeline":
        from model.inpaint import Text2EarthInpaintPipeline

        return Text2EarthInpaintPipeline
    raise AttributeError(f"module 'model' has no attribute {name!r}")
