"""The Text2Earth resolution-conditioned latent diffusion model: training, evaluation and generation.

Not built yet: it arrives with the model issue (`Text2EarthPipeline`, DCA training, evaluation). The
package exists so the project layout, imports and packaging are in place from the start.
"""
