"""The denoising UNet: Stable Diffusion 2's `UNet2DConditionModel` conditioned on the resolution level.

The level enters as `class_labels` with `class_embed_type="timestep"` (the timestep's sinusoid, its own MLP,
added to the time embedding), exactly the released Text2Earth layout, so the default model is a plain diffusers
UNet. The optional extras of `ConditioningParams` (continuous log2 GSD, lon/lat/month metadata, learnable null
embeddings) need `Text2EarthUNet`, a subclass that saves and loads through the same `from_pretrained`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from model.config import NULL_LEVEL, UNET_PRESETS, ConditioningParams
from pipeline.errors import ParamsError

__all__ = [
    "DEFAULT_CONDITIONING",
    "Text2EarthUNet",
    "add_resolution_embedding",
    "build_unet",
    "conditioning_labels",
    "predict_noise",
    "unet_conditioning",
]

# Continuous values are mapped affinely onto the timestep range before the sinusoid, so their spread uses the
# frequencies the time embedding already resolves (DiffusionSat rescales its metadata the same way).
TIMESTEP_SPAN = 1000.0
VALUE_RANGES: dict[str, tuple[float, float]] = {
    "log2_gsd": (-6.0, 16.0),  # 1/64 m .. 64 km: levels 23..1
    "lon": (-180.0, 180.0),
    "lat": (-90.0, 90.0),
    "month": (1.0, 12.0),
}


# The paper's conditioning: the integer level only (mypy does not see pydantic's field defaults).
DEFAULT_CONDITIONING = ConditioningParams(mode="level", metadata=[], learnable_null=False)


def _to_timestep_range(values: torch.Tensor, kind: str) -> torch.Tensor:
    low, high = VALUE_RANGES[kind]
    return (values - low) * (TIMESTEP_SPAN / (high - low))


def _zero_last_layer(embedding: TimestepEmbedding) -> None:
    """Zero the MLP's output layer: its embedding is then exactly 0 until training moves it."""
    nn.init.zeros_(embedding.linear_2.weight)
    if embedding.linear_2.bias is not None:
        nn.init.zeros_(embedding.linear_2.bias)


class Text2EarthUNet(UNet2DConditionModel):
    """`UNet2DConditionModel` with the optional conditioning extras (off in the paper's model).

    - `resolution_mode="log_gsd"`: `class_labels` carries the GSD in metres (nan or <= 0: unknown) and its
      log2 goes through the sinusoid and the class MLP, instead of the integer level.
    - `metadata_fields` (any of lon, lat, month): each value passes through the sinusoid and its own MLP, summed
      into the time embedding (DiffusionSat); given as `added_cond_kwargs={"lon": B, ...}`, nan = unknown.
    - `learnable_null`: unknown values use a learned vector (GeoCore) instead of level 0's MLP output
      (level mode) or a zero embedding (log_gsd and metadata).
    The constructor takes every `UNet2DConditionModel` argument too (see the signature set below the class).
    """

    def __init__(
        self,
        *,
        resolution_mode: str = "level",
        metadata_fields: list[str] | tuple[str, ...] | None = None,
        learnable_null: bool = False,
        **unet_kwargs: Any,
    ) -> None:
        if resolution_mode not in ("level", "log_gsd"):
            raise ValueError(f"resolution_mode must be 'level' or 'log_gsd', got {resolution_mode!r}")
        unknown = sorted(set(metadata_fields or ()) - {"lon", "lat", "month"})
        if unknown:
            raise ValueError(f"metadata_fields may hold lon, lat, month; got {unknown}")
        unet_kwargs["class_embed_type"] = "timestep"  # the resolution MLP is the class embedding in both modes
        super().__init__(**unet_kwargs)
        fields = list(metadata_fields or [])
        self.register_to_config(resolution_mode=resolution_mode, metadata_fields=fields,
                                learnable_null=learnable_null)
        in_dim = self.time_embedding.linear_1.in_features
        embed_dim = self.time_embedding.linear_2.out_features
        act_fn = self.config["act_fn"]
        self.metadata_embedding = nn.ModuleDict(
            {field: TimestepEmbedding(in_dim, embed_dim, act_fn=act_fn) for field in fields})
        self.null_embedding = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(embed_dim)) for name in ["resolution", *fields]}
            if learnable_null else {})

    def _null_filled(self, name: str, embedding: torch.Tensor, is_null: torch.Tensor) -> torch.Tensor:
        if self.config["learnable_null"]:
            fill = self.null_embedding[name].to(embedding.dtype)
        else:
            fill = torch.zeros((), dtype=embedding.dtype, device=embedding.device)
        return torch.where(is_null[:, None].to(embedding.device), fill, embedding)

    def get_class_embed(self, sample: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor | None:
        """The resolution embedding: the level (0 = unknown) or log2 of the GSD in metres (nan = unknown)."""
        if class_labels is None:
            raise ValueError("Text2EarthUNet needs class_labels: the level (0 = unknown), or the GSD in metres "
                             "(nan = unknown) when resolution_mode is log_gsd; see model.unet.conditioning_labels")
        if self.config["resolution_mode"] == "level":
            is_null = class_labels == NULL_LEVEL
            values = class_labels
        else:
            gsd = class_labels.float()
            is_null = ~(torch.isfinite(gsd) & (gsd > 0))
            values = _to_timestep_range(torch.log2(torch.where(is_null, torch.ones_like(gsd), gsd)), "log2_gsd")
        embedding = self.class_embedding(self.time_proj(values).to(sample.dtype)).to(sample.dtype)
        if self.config["resolution_mode"] == "level" and not self.config["learnable_null"]:
            return embedding  # the paper: level 0 goes through the MLP like any level
        return self._null_filled("resolution", embedding, is_null)

    def get_aug_embed(
        self, emb: torch.Tensor, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict[str, Any]
    ) -> torch.Tensor | None:
        """Sum the metadata embeddings (missing field or nan: the null embedding) into the time embedding."""
        total = super().get_aug_embed(emb, encoder_hidden_states, added_cond_kwargs)
        given = added_cond_kwargs or {}  # forward passes None when the caller gave nothing
        batch = emb.shape[0]
        for field in self.config["metadata_fields"]:
            value = given.get(field)
            if value is None:
                value = torch.full((batch,), math.nan)
            value = torch.as_tensor(value, dtype=torch.float32, device=emb.device).reshape(-1).expand(batch)
            is_null = ~torch.isfinite(value)
            low = VALUE_RANGES[field][0]
            proj = self.time_proj(_to_timestep_range(torch.where(is_null, torch.full_like(value, low), value), field))
            embedding = self._null_filled(field, self.metadata_embedding[field](proj.to(emb.dtype)), is_null)
            total = embedding if total is None else total + embedding
        return total


def _text2earth_unet_signature() -> inspect.Signature:
    """The parent's keyword arguments plus ours, so diffusers' config loading passes every saved key through."""
    parent = inspect.signature(UNet2DConditionModel.__init__)
    ours = inspect.signature(Text2EarthUNet.__init__)
    extras = [p for p in ours.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return parent.replace(parameters=[*parent.parameters.values(), *extras])


Text2EarthUNet.__init__.__signature__ = _text2earth_unet_signature()  # type: ignore[attr-defined]


def _is_default(conditioning: ConditioningParams) -> bool:
    return conditioning.mode == "level" and not conditioning.metadata and not conditioning.learnable_null


def _extras(conditioning: ConditioningParams) -> dict[str, Any]:
    return {"resolution_mode": conditioning.mode, "metadata_fields": list(conditioning.metadata),
            "learnable_null": conditioning.learnable_null}


def build_unet(size: str, conditioning: ConditioningParams | None = None) -> UNet2DConditionModel:
    """A randomly initialised UNet of a preset size; a plain diffusers UNet unless extras are switched on."""
    if size not in UNET_PRESETS:
        raise ParamsError(f"train.size: unknown model size {size!r}; allowed: {sorted(UNET_PRESETS)}")
    config = dict(UNET_PRESETS[size])
    conditioning = conditioning or DEFAULT_CONDITIONING
    if _is_default(conditioning):
        return UNet2DConditionModel(**config)
    return Text2EarthUNet(**config, **_extras(conditioning))


def _unwrap(unet: nn.Module) -> Any:
    """The UNet itself under DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(unet, "module", None)
        if inner is None:
            inner = getattr(unet, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return unet
        unet = inner


def unet_conditioning(unet: nn.Module) -> ConditioningParams | None:
    """The conditioning a UNet takes, or None for a UNet without a resolution embedding (plain SD2)."""
    config = _unwrap(unet).config
    if config.get("class_embed_type") != "timestep":
        return None
    return ConditioningParams(mode=config.get("resolution_mode", "level"),
                              metadata=list(config.get("metadata_fields") or []),
                              learnable_null=bool(config.get("learnable_null", False)))


def add_resolution_embedding(unet: UNet2DConditionModel,
                             conditioning: ConditioningParams | None = None) -> UNet2DConditionModel:
    """Give a pretrained UNet the resolution (and any extra) embeddings, every new one starting at exactly zero.

    The output layer of each new MLP is zero-initialised, so at step 0 the model predicts what the pretrained
    model did and fine-tuning starts from its behaviour. A UNet that already takes `conditioning` is returned
    as is; one taking other extras is rebuilt with the requested ones, keeping every weight that still fits.
    """
    conditioning = conditioning or DEFAULT_CONDITIONING
    if unet.config.get("class_embed_type") not in (None, "timestep") or unet.config.get("num_class_embeds"):
        raise ValueError(f"this UNet already has a {unet.config.get('class_embed_type')!r} class embedding; "
                         "Text2Earth needs none (to add its own) or class_embed_type='timestep'")
    current = unet_conditioning(unet)
    if current == conditioning:
        return unet
    parameter = next(unet.parameters())
    if current is None and _is_default(conditioning) and type(unet) is UNet2DConditionModel:
        # In place: building a second 865M-parameter UNet only to copy weights into it is slow and doubles memory.
        embedding = TimestepEmbedding(unet.time_embedding.linear_1.in_features,
                                      unet.time_embedding.linear_2.out_features, act_fn=unet.config["act_fn"])
        _zero_last_layer(embedding)
        unet.class_embedding = embedding.to(device=parameter.device, dtype=parameter.dtype)  # type: ignore[assignment]
        unet.register_to_config(class_embed_type="timestep")
        return unet
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    for key in ("resolution_mode", "metadata_fields", "learnable_null"):
        config.pop(key, None)
    config["class_embed_type"] = "timestep"
    rebuilt: UNet2DConditionModel = (UNet2DConditionModel(**config) if _is_default(conditioning)
                                     else Text2EarthUNet(**config, **_extras(conditioning)))
    missing, _ = rebuilt.load_state_dict(unet.state_dict(), strict=False)
    # "metadata_embedding.lon.linear_1.weight" -> "metadata_embedding.lon"; "class_embedding.linear_2.bias" -> ...
    new_modules = {".".join(key.split(".")[:2 if key.startswith("metadata_embedding.") else 1]) for key in missing}
    if current is None or current.mode != conditioning.mode:
        new_modules.add("class_embedding")  # a different input (level vs log2 GSD): the old MLP means nothing
    for name in new_modules:
        submodule = rebuilt.get_submodule(name)
        if isinstance(submodule, TimestepEmbedding):
            _zero_last_layer(submodule)
    module = cast(nn.Module, rebuilt)  # moved in place; ModelMixin.to's wrapper hides nn.Module's signature
    module.to(parameter.device)
    if parameter.dtype != torch.float32:  # ModelMixin warns on any dtype cast, even a no-op one
        module.to(parameter.dtype)
    module.train(unet.training)
    return rebuilt


def conditioning_labels(unet: nn.Module, levels: torch.Tensor, gsd_m: torch.Tensor | None = None
                        ) -> torch.Tensor | None:
    """The `class_labels` a UNet expects for these levels (0 = unknown) and optional GSDs in metres (nan = unknown).

    Level mode takes the level itself. log_gsd mode takes the GSD: `gsd_m` where given and finite, else the
    level's nominal 2^(17 - level) m; level 0 always means unknown, so dropping the level (DCA) drops the GSD too.
    A UNet without a resolution embedding (plain SD2) takes none.
    """
    condition = unet_conditioning(unet)
    if condition is None:
        return None
    if condition.mode == "level":
        return levels.long()
    nominal = torch.exp2(17.0 - levels.double()).float()
    gsd = nominal if gsd_m is None else torch.where(torch.isfinite(gsd_m), gsd_m.float(), nominal)
    return torch.where(levels == NULL_LEVEL, torch.full_like(gsd, math.nan), gsd)


def predict_noise(
    unet: nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor | int,
    text_embeds: torch.Tensor,
    levels: torch.Tensor,
    *,
    gsd_m: torch.Tensor | None = None,
    metadata: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One UNet call with Text2Earth's conditioning; shared by training (works through DDP) and the pipeline."""
    labels = conditioning_labels(unet, levels.to(latents.device), None if gsd_m is None else gsd_m.to(latents.device))
    added = dict(metadata) if metadata else None
    output: torch.Tensor = unet(latents, timesteps, encoder_hidden_states=text_embeds, class_labels=labels,
                                added_cond_kwargs=added, return_dict=False)[0]
    return output
