"""app.py, the browser demo, served on 127.0.0.1 and driven through gradio's own client, as the page drives it."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, run_python
from PIL import Image

from cond_ddpm.grids import captioned_grid
from pipeline_cond_ddpm import SCHEDULERS, CondDDPMPipeline

# The demo extra (pip install .[demo]): without it these tests are skipped, and the others run.
pytest.importorskip("gradio", reason="app.py needs the demo extra: pip install .[demo]")
Client = pytest.importorskip("gradio_client", reason="the demo extra: pip install .[demo]").Client
AppError = pytest.importorskip("gradio_client.exceptions").AppError  # how the client reports a message in the page

import app  # noqa: E402 (needs gradio)

OFFLINE = {"GRADIO_ANALYTICS_ENABLED": "False"}
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # its pandas calls, not this project's to fix


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect(url, downloads, server=None, log=None, timeout=300) -> Client:
    """A client of the app at `url` once it answers; a `server` process that exits first fails the test with its log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads))
        except Exception:  # not listening yet: httpx raises connection errors of several types
            if server is not None and server.poll() is not None:
                pytest.fail(f"app.py exited with {server.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def served(tiny_pipeline_dir, tmp_path_factory):
    """`python app.py --pipeline FOLDER` on a free port of 127.0.0.1, as a user starts it, and a client of it."""
    port, work = free_port(), tmp_path_factory.mktemp("app")
    command = [sys.executable, "app.py", "--pipeline", tiny_pipeline_dir, "--device", "cpu"]
    command += ["--server_name", "127.0.0.1", "--server_port", str(port)]
    environment = {**os.environ, **OFFLINE, "GRADIO_TEMP_DIR": str(work / "gradio")}
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield connect(f"http://127.0.0.1:{port}/", work / "downloads", server, work / "server.log")
    finally:
        server.terminate()
        server.wait(timeout=30)


def draw(client, objects, num_images=1, seed=0, scheduler="euler-a", steps=3, guidance=3.0, denoising=False):
    return client.predict(objects, num_images, seed, scheduler, steps, guidance, denoising, api_name="/draw")


def test_a_label_set_gives_the_pipelines_images_in_a_captioned_grid(served, tiny_pipeline_dir):
    objects, seed = ["red cube", "blue sphere"], 5
    grid, strip, note = draw(served, objects, num_images=10, seed=seed, steps=3, denoising=True)
    # What the pipeline draws with seeds 5..14, laid out by the project's grid code: rows of 4, 4 and 2 images of 16
    # pixels, shown 128 wide, each with its seed and objects under it.
    pipeline = CondDDPMPipeline.from_pretrained(tiny_pipeline_dir)
    pipeline.scheduler = SCHEDULERS["euler-a"](pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(10)]
    images = pipeline([objects] * 10, 3, 3.0, generator=generators).images
    captions = [[f"seed {seed + i}", *objects] for i in range(10)]
    expected = np.asarray(captioned_grid(images, captions, columns=4), dtype=int)
    shown = np.asarray(Image.open(grid).convert("RGB"), dtype=int)
    assert shown.shape == expected.shape == (3 * (128 + 3 * 14), 4 * 128, 3)
    assert np.abs(shown - expected).max() <= 1  # the same pixels, up to rounding
    assert note == "10 image(s) of red cube, blue sphere: euler-a, 3 steps, guidance 3.0."
    # The denoising strip on request: one frame per step here (3 steps), each with its timestep and the objects.
    assert strip["visible"]
    assert Image.open(strip["value"]).size == (3 * 128, 128 + 3 * 14)
    assert draw(served, objects)[1]["visible"] is False  # and none when not asked for


def test_more_objects_than_training_saw_are_drawn_with_a_warning(served):
    objects = ["red cube", "blue sphere", "gray cylinder", "cyan cube"]
    grid, _, note = draw(served, objects)
    assert "Training saw at most 3 objects in a scene" in note
    assert Image.open(grid).size == (128, 128 + 5 * 14)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"objects": []}, "No object picked: pick 1 to 3 of the 24 objects"),
        ({"steps": 0}, "steps must be an integer from 1 to 1000, got 0"),
        ({"steps": 5000}, "steps must be an integer from 1 to 1000, got 5000"),
        ({"guidance": 101}, "guidance must be a number from 0 to 100.0, got 101"),
        ({"num_images": 17}, "number of images must be an integer from 1 to 16, got 17"),
        ({"scheduler": "plms"}, "unknown scheduler 'plms'; choose one of"),
        ({"objects": ["red cub"]}, "unknown object name 'red cub'; did you mean 'red cube'"),
    ],
)
def test_bad_input_gets_a_message_in_the_page(served, change, message):
    request = {"objects": ["red cube"], **change}
    with pytest.raises(AppError) as shown:
        draw(served, **request)
    assert str(shown.value).startswith(message)


def test_a_pipeline_of_another_vocabulary_offers_its_own_objects(tmp_path, monkeypatch):
    for name, value in {**OFFLINE, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}.items():
        monkeypatch.setenv(name, value)
    torch.manual_seed(0)
    CondDDPMPipeline.from_preset("tiny", ["red torus", "blue cone"], resolution=16).save_pretrained(tmp_path / "pipe")
    demo = app.build_demo(app.load_pipeline(str(tmp_path / "pipe"), "cpu"))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = connect(f"http://127.0.0.1:{port}/", tmp_path / "downloads")
        offered = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/draw"]["parameters"][0]
        assert offered["type"]["items"]["enum"] == ["red torus", "blue cone"]
        page = [c["props"].get("value") or "" for c in client.config["components"] if c["type"] == "markdown"]
        assert any("trained on 2 objects of its own, not i-CLEVR's 24" in text for text in page)
        grid, strip, _ = draw(client, ["blue cone"], steps=2, denoising=True)
        assert Image.open(grid).size == (128, 128 + 2 * 14) and Image.open(strip["value"]).size == (2 * 128, 128 + 28)
        with pytest.raises(AppError, match="unknown object name 'red cube'"):
            draw(client, ["red cube"])
    finally:
        demo.close()


def test_an_unknown_pipeline_folder_stops_the_app_with_one_line(tmp_path):
    missing = tmp_path / "missing"
    result = run_python("app.py", "--pipeline", missing, env=OFFLINE, timeout=300)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {missing} is not a folder: give a saved pipeline folder, or a Hub")
