"""What the UNet learns: the trained modules as one `Denoiser`, and the denoising loss of a batch."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn

from pipeline_cond_ddpm import CondDDPMPipeline


class Denoiser(nn.Module):
    """The trained modules as one: Accelerate (DDP, autocast) needs a single forward that uses every parameter."""

    def __init__(self, unet, label_embedding):
        super().__init__()
        self.unet, self.label_embedding = unet, label_embedding

    def forward(self, noisy_images, timesteps, labels, **unet_inputs):
        """The UNet's prediction; `unet_inputs` go to the UNet too (a distilled student's `timestep_cond`)."""
        return self.unet(noisy_images, timesteps, **self.label_embedding(labels), **unet_inputs).sample


def build_pipeline(accelerator, denoiser, noise_scheduler) -> CondDDPMPipeline:
    model = accelerator.unwrap_model(denoiser)
    return CondDDPMPipeline(unet=model.unet, label_embedding=model.label_embedding, scheduler=noise_scheduler)


@dataclass(frozen=True)
class Objective:
    """The loss's settings, named as the training flags that set them."""

    prediction_type: str  # "epsilon" or "v_prediction"
    condition_dropout: float  # how often the null label replaces the labels, for classifier-free guidance
    snr_gamma: float | None  # min-SNR weighting; None: off
    random_flip: bool  # mirror half the images


def diffusion_loss(objective: Objective, denoiser, noise_scheduler, batch) -> torch.Tensor:
    """The denoising loss of one batch: noise at random timesteps, the null label at random for classifier-free
    guidance, the target of `prediction_type`, min-SNR weighting with `snr_gamma`."""
    images = batch["pixel_values"].to(memory_format=torch.channels_last)
    labels = batch["labels"]
    if objective.random_flip:  # here, not in the data workers, so the global RNG (saved in checkpoints) decides
        flip = torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5
        images = torch.where(flip, images.flip(-1), images)
    noise = torch.randn_like(images)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (len(images),), device=images.device)
    noisy_images = noise_scheduler.add_noise(images, noise, timesteps)
    keep = torch.rand(len(labels), 1, device=labels.device) >= objective.condition_dropout
    epsilon = objective.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(images, noise, timesteps)
    prediction = denoiser(noisy_images, timesteps, labels * keep)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if objective.snr_gamma is not None:  # min-SNR weighting (Hang et al. 2023)
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=objective.snr_gamma) / (snr if epsilon else snr + 1)
        loss = loss * weight
    return loss.mean()
