"""A browser demo of a trained CondDDPMPipeline: pick objects, see the scenes drawn and, on request, their denoising.

    python app.py --pipeline runs/cpu-synthetic    # a saved folder or a Hub id; then open http://127.0.0.1:7860

The Gradio app beside the model, the file a Hugging Face Space runs (`app_file: app.py`). Its sampling defaults are
the pipeline file's, its pictures are `cond_ddpm/grids.py`'s captioned grid and `cond_ddpm/sampling.py`'s denoising
strip. Sampling runs on the GPU where there is one. Needs the demo extra: `pip install .[demo]`.
"""

import math
import os
from pathlib import Path

import gradio as gr
import torch

from cond_ddpm import cli, sampling
from cond_ddpm.data import read_objects_json
from cond_ddpm.grids import captioned_grid
from pipeline_cond_ddpm import (
    DEFAULT_GUIDANCE_SCALE,
    SCHEDULERS,
    CondDDPMPipeline,
    multi_hot,
)

DEFAULT_PIPELINE = "runs/cpu-synthetic"  # where `make train` saves
MAX_TRAINED_OBJECTS = 3  # i-CLEVR's scenes, and the built-in synthetic ones, hold 1 to 3 objects
MAX_IMAGES = 16  # two rows of the grid; more would keep a CPU busy for minutes
GRID_COLUMNS = 4  # the default 8 images in two rows: large enough in the page to read their captions


def load_pipeline(location: str, device: str) -> CondDDPMPipeline:
    """The pipeline saved at `location` (a folder or a Hub id), on `device`."""
    if location == DEFAULT_PIPELINE and not Path(location).is_dir():
        # Otherwise the name would be looked up on the Hub, and the message would be about the network.
        raise FileNotFoundError(
            f"{location} does not exist yet: `make train` writes it; or give --pipeline a saved folder or a Hub id"
        )
    return CondDDPMPipeline.from_pretrained(location).to(device)


def bad_input(message: str) -> gr.Error:
    """An error the page shows as `message`; it is the user's to fix, so the server's log gets no traceback of it."""
    return gr.Error(message, print_exception=False)


def checked(name: str, value, low, high, integer: bool = False):
    """`value` as a number in [low, high] (a whole one, with `integer`), or a message in the page that names it."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (is_number and low <= value <= high and (not integer or value == int(value))):
        raise bad_input(f"{name} must be {'an integer' if integer else 'a number'} from {low} to {high}, got {value!r}")
    return int(value) if integer else float(value)


def build_demo(pipeline: CondDDPMPipeline) -> gr.Blocks:
    """The page: the pipeline's objects to pick and the sampling settings on the left, the pictures on the right."""
    class_names = pipeline.class_names
    # A distilled pipeline starts at its LCM scheduler's few steps, among the solver's it was distilled on.
    default_scheduler, default_steps = sampling.default_sampler(pipeline)
    max_steps = pipeline.max_inference_steps
    iclevr = read_objects_json()
    vocabulary = (
        ""
        if class_names == iclevr
        else f"It was trained on {len(class_names)} objects of its own, not i-CLEVR's {len(iclevr)}:"
        " its objects are offered."
    )

    def draw(
        objects,
        num_images,
        seed,
        scheduler,
        steps,
        guidance,
        show_denoising,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (gradio's way to show progress; it follows the tqdm bars)
    ):
        if not objects:
            raise bad_input(f"No object picked: pick 1 to {MAX_TRAINED_OBJECTS} of the {len(class_names)} objects.")
        num_images = checked("number of images", num_images, 1, MAX_IMAGES, integer=True)
        seed = checked("seed", seed, 0, cli.MAX_SEED, integer=True)
        steps = checked("steps", steps, 1, max_steps, integer=True)
        guidance = checked("guidance", guidance, 0, cli.MAX_GUIDANCE_SCALE)
        try:
            multi_hot([objects], class_names)  # names the unknown or repeated object before any sampling
            sampling.set_scheduler(pipeline, scheduler)
        except ValueError as error:
            raise bad_input(str(error)) from None
        note = f"{num_images} image(s) of {', '.join(objects)}: {scheduler}, {steps} steps, guidance {guidance}."
        if len(objects) > MAX_TRAINED_OBJECTS:
            warning = f"Training saw at most {MAX_TRAINED_OBJECTS} objects in a scene: expect some to be missing."
            gr.Warning(warning)
            note += f" {warning}"
        # One generator per image, seeded seed + i as in `evaluate_iclevr.py score`: an image does not depend on how
        # many are drawn with it.
        generators = [torch.Generator(pipeline.device).manual_seed(seed + i) for i in range(num_images)]
        pipeline.set_progress_bar_config(desc=f"drawing {num_images} image(s)", unit="step")
        images = pipeline([objects] * num_images, steps, guidance, generator=generators).images
        grid = captioned_grid(images, [[f"seed {seed + i}", *objects] for i in range(num_images)], GRID_COLUMNS)
        strip = None
        if show_denoising:  # the sampler chosen above is the pipeline's scheduler now
            strip, _ = sampling.denoising_strip(pipeline, objects, steps, guidance, seed=seed)
        return grid, gr.Image(strip, visible=strip is not None), note

    with gr.Blocks(title="cond-ddpm: i-CLEVR scenes", analytics_enabled=False) as demo:
        gr.Markdown(f"# cond-ddpm: i-CLEVR scenes from object names\nPipeline: `{pipeline.name_or_path}`. {vocabulary}")
        with gr.Row():
            with gr.Column(scale=1):
                objects = gr.CheckboxGroup(class_names, label=f"objects (1 to {MAX_TRAINED_OBJECTS}, as in training)")
                with gr.Row():
                    num_images = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="number of images")
                    seed = gr.Number(0, label="seed (image i uses seed + i)", precision=0)
                scheduler = gr.Dropdown(list(SCHEDULERS), value=default_scheduler, label="sampler")
                steps = gr.Slider(1, max_steps, value=default_steps, step=1, label="steps")
                guidance = gr.Slider(
                    0, cli.MAX_GUIDANCE_SCALE, value=DEFAULT_GUIDANCE_SCALE, step=0.5, label="guidance (1 or less: off)"
                )
                show_denoising = gr.Checkbox(label="also draw the denoising of the first image")
                button = gr.Button("Draw", variant="primary")
            with gr.Column(scale=2):
                note = gr.Markdown()
                grid = gr.Image(label="the images, each with its seed and objects", type="pil", format="png")
                strip = gr.Image(label="its denoising, noise to image", type="pil", format="png", visible=False)
        # preprocess=False: out-of-range values reach `draw`, whose messages name the setting (gradio's own do not).
        button.click(
            draw,
            [objects, num_images, seed, scheduler, steps, guidance, show_denoising],
            [grid, strip, note],
            api_name="draw",
            preprocess=False,
        )
    return demo


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument(
        "--pipeline",
        default=os.environ.get("COND_DDPM_PIPELINE", DEFAULT_PIPELINE),
        help="a folder saved by the training script, or a Hub id; $COND_DDPM_PIPELINE sets the default (a Space's)",
    )
    parser.add_argument(
        "--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu", help="where to sample"
    )
    parser.add_argument("--server_name", help="the address to serve on; gradio's default is 127.0.0.1")
    parser.add_argument("--server_port", type=cli.integer(1, 65535), help="the port; gradio's default is 7860")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    pipeline = cli.run(load_pipeline, args.pipeline, args.device)
    # None leaves the address to gradio, which reads $GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT (set on a Space).
    build_demo(pipeline).launch(server_name=args.server_name, server_port=args.server_port, share=False)


if __name__ == "__main__":
    main()
