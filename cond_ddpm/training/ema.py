"""The EMA copies of the trained modules (diffusers' `EMAModel`), one per module of the `Denoiser`."""

from contextlib import contextmanager

from diffusers.training_utils import EMAModel


def make_emas(
    denoiser, max_decay: float, inv_gamma: float = 1.0, power: float = 3 / 4, min_decay: float = 0.0
) -> dict[str, EMAModel]:
    """One EMA copy per trained module, keyed by its attribute name on `Denoiser`, warming up to `max_decay`
    (`min_decay` = `max_decay`: no warm-up, the same decay from the second step on)."""
    return {
        name: EMAModel(
            module.parameters(),
            decay=max_decay,
            min_decay=min_decay,
            use_ema_warmup=True,
            inv_gamma=inv_gamma,
            power=power,
            model_cls=type(module),
            model_config=module.config,
            foreach=True,  # all tensors at once: tensor by tensor, the EMA cost a GPU run 9% of its images/s
        )
        for name, module in (("unet", denoiser.unet), ("label_embedding", denoiser.label_embedding))
    }


def update_ema(accelerator, denoiser, emas):
    model = accelerator.unwrap_model(denoiser)
    for name, ema in emas.items():
        ema.step(getattr(model, name).parameters())


def copy_emas_into(emas, model):
    """Give `model`, a `Denoiser` outside the optimizer, the EMA weights (the distillation's target network)."""
    for name, ema in emas.items():
        ema.copy_to(getattr(model, name).parameters())


@contextmanager
def ema_weights(accelerator, denoiser, emas):
    """Swap the EMA weights into the model for the duration of a `with` block (no-op without EMA)."""
    model = accelerator.unwrap_model(denoiser)
    for name, ema in emas.items():
        ema.store(getattr(model, name).parameters())
    copy_emas_into(emas, model)
    try:
        yield
    finally:
        for name, ema in emas.items():
            ema.restore(getattr(model, name).parameters())
