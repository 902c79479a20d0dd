"""What a distilled student learns: latent consistency distillation (Luo et al. 2023) of a `CondDDPMPipeline`, as
diffusers' `examples/consistency_distillation/train_lcm_distill_sd_wds.py` does it, in pixels instead of latents.

The student is the teacher plus one input, the guidance scale (`time_cond_proj_dim`). From a training image noised
at a timestep of a skipping DDIM solver, the teacher takes one guided DDIM step; the student's consistency function
must map the start to the image that a slowly trailing copy of itself (the target network) maps the end to.
"""

import copy
from dataclasses import dataclass

import torch
from diffusers import LCMScheduler, UNet2DConditionModel

from pipeline_cond_ddpm import CondDDPMPipeline, guidance_scale_embedding


def make_student(
    teacher: CondDDPMPipeline, time_cond_proj_dim: int, num_ddim_timesteps: int, timestep_scaling: float
) -> CondDDPMPipeline:
    """A student that starts as the teacher: the same weights, and a guidance input whose projection is zero, so its
    first prediction is the teacher's conditional one. Its scheduler is the LCM scheduler of the same noise schedule,
    picking its steps among the solver's `num_ddim_timesteps`."""
    if not isinstance(teacher.unet, UNet2DConditionModel):
        raise ValueError(
            f"the teacher's UNet is a {type(teacher.unet).__name__}, which takes no guidance input; distillation needs"
            " a UNet2DConditionModel teacher (a preset with cross-attention, such as cpu or gpu)"
        )
    if teacher.is_distilled:
        raise ValueError("the teacher is already a distilled pipeline; distil the pipeline it was distilled from")
    num_train_timesteps = teacher.scheduler.config.num_train_timesteps
    if num_ddim_timesteps > num_train_timesteps:
        raise ValueError(
            f"--num_ddim_timesteps {num_ddim_timesteps} exceeds the {num_train_timesteps} timesteps of the teacher's"
            " noise schedule"
        )
    unet = UNet2DConditionModel.from_config(teacher.unet.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = unet.load_state_dict(teacher.unet.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("time_embedding.cond_proj") for key in missing), missing
    torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    # The DDPM scheduler's variance_type means nothing to an LCM scheduler, which would warn of it at every load.
    noise_schedule = {key: value for key, value in teacher.scheduler.config.items() if key != "variance_type"}
    scheduler = LCMScheduler.from_config(
        noise_schedule, original_inference_steps=num_ddim_timesteps, timestep_scaling=timestep_scaling
    )
    return CondDDPMPipeline(unet=unet, label_embedding=copy.deepcopy(teacher.label_embedding), scheduler=scheduler)


@dataclass(frozen=True)
class Distillation:
    """The consistency loss's settings, named as the distillation flags that set them."""

    num_ddim_timesteps: int  # the teacher's solver: every (num_train_timesteps / this)-th timestep
    w_min: float  # the guidance drawn per image is w + 1, w uniform in [w_min, w_max]
    w_max: float
    loss_type: str  # "l2" or "huber"
    huber_c: float
    time_cond_proj_dim: int  # the width of the student's guidance embedding


def predicted_image_and_noise(model_output, timesteps, sample, noise_scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean image and the noise that a UNet's output at `timesteps` implies, for the schedule's prediction type."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(sample.device)[timesteps].view(-1, 1, 1, 1)
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    if noise_scheduler.config.prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    return (sample - sigma * model_output) / alpha, model_output


def boundary_scalings(student_scheduler: LCMScheduler, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip and c_out at `timesteps`, shaped to multiply images: at t = 0 the student's output is its input."""
    c_skip, c_out = student_scheduler.get_scalings_for_boundary_condition_discrete(timesteps.float())
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def consistency_loss(distillation, student, target, teacher, noise_scheduler, student_scheduler, batch):
    """The consistency distillation loss of one batch. `student`, `target` and `teacher` are `Denoiser`s; only the
    student is trained."""
    images, labels = batch["pixel_values"].to(memory_format=torch.channels_last), batch["labels"]
    num_images = len(images)
    # A timestep of the solver's (t_n+k) and the one the solver steps to (t_n); the last step ends at 0.
    skip = noise_scheduler.config.num_train_timesteps // distillation.num_ddim_timesteps
    index = torch.randint(1, distillation.num_ddim_timesteps + 1, (num_images,), device=images.device)
    start = index * skip - 1
    end = (start - skip).clamp(min=0)
    noise = torch.randn_like(images)
    noisy_images = noise_scheduler.add_noise(images, noise, start)
    w = torch.rand(num_images, device=images.device) * (distillation.w_max - distillation.w_min) + distillation.w_min
    guidance = guidance_scale_embedding(w + 1, distillation.time_cond_proj_dim)
    w = w.view(-1, 1, 1, 1)

    c_skip_start, c_out_start = boundary_scalings(student_scheduler, start)
    output = student(noisy_images, start, labels, timestep_cond=guidance)
    predicted, _ = predicted_image_and_noise(output, start, noisy_images, noise_scheduler)
    student_image = c_skip_start * noisy_images + c_out_start * predicted

    with torch.no_grad():
        null_labels = torch.zeros_like(labels)
        both = teacher(
            torch.cat([noisy_images, noisy_images]), torch.cat([start, start]), torch.cat([labels, null_labels])
        )
        conditional, unconditional = both.chunk(2)
        image_c, noise_c = predicted_image_and_noise(conditional, start, noisy_images, noise_scheduler)
        image_u, noise_u = predicted_image_and_noise(unconditional, start, noisy_images, noise_scheduler)
        guided_image = image_c + w * (image_c - image_u)  # LCM's w: guidance scale w + 1
        guided_noise = noise_c + w * (noise_c - noise_u)
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(images.device)[end].view(-1, 1, 1, 1)
        previous = alphas_cumprod.sqrt() * guided_image + (1 - alphas_cumprod).sqrt() * guided_noise  # DDIM step

        c_skip_end, c_out_end = boundary_scalings(student_scheduler, end)
        output = target(previous.to(images.dtype), end, labels, timestep_cond=guidance)
        predicted, _ = predicted_image_and_noise(output, end, previous, noise_scheduler)
        target_image = c_skip_end * previous + c_out_end * predicted

    student_image, target_image = student_image.float(), target_image.float()
    if distillation.loss_type == "l2":
        return torch.nn.functional.mse_loss(student_image, target_image)
    return (((student_image - target_image) ** 2 + distillation.huber_c**2).sqrt() - distillation.huber_c).mean()
