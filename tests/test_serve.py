"""`sherl-pipe serve`: a real HTTP server on a free loopback port, talked to with a real client:
answers equal predict's, from an export (ONNX Runtime) and from a run folder; bad requests get a
4xx with one line of JSON and the server goes on; 64 concurrent clients are all answered; Ctrl-C
stops it cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import make_text_file
from sherl_pipe.config import load_pipeline
from sherl_pipe.export import export
from sherl_pipe.extraction import extract
from sherl_pipe.prediction import Predictor
from sherl_pipe.serve import OnnxModel, make_app, open_model
from sherl_pipe.training import train

pytestmark = pytest.mark.slow  # every test starts from a trained, exported run (the module's fixture)

TEXTS = ["good film", "bad plot", "a great film " * 12, "dull"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bert_dir):
    root = tmp_path_factory.mktemp("serve")
    data = make_text_file(root / "data.csv", n=80, seed=4)
    path = root / "p.toml"
    path.write_text(f'[data]\nsource = "{data}"\nsplit_sizes = [0.7, 0.3, 0.0]\n[backbone]\nsource = "{bert_dir}"\n'
                    f'max_length = 24\n[extract]\ncache = "{root / "cache"}"\ndtype = "float32"\n[train]\n'
                    f'run_dir = "{root / "run"}"\nmax_steps = 4\nbatch_size = 8\nthreads = 1\n')
    pipe = load_pipeline(str(path))
    extract(pipe)
    train(pipe, log=lambda m: None)
    return root / "run", export(root / "run", root / "export", quantize="int8", log=lambda m: None)


class Server:
    """The app under uvicorn in a thread of this process, on a free port."""

    def __init__(self, path, int8=False, **kw):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(make_app(open_model(str(path), int8=int8), **kw), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def probabilities(run, texts):
    return softmax(Predictor.load(run).outputs(texts).numpy())


@pytest.mark.parametrize("which", ["export", "run"])
def test_answers_equal_predicts(trained, which):
    run, folder = trained
    with Server(folder if which == "export" else run) as url:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        r = httpx.post(f"{url}/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    want = probabilities(run, TEXTS)
    np.testing.assert_allclose([[p["probabilities"][n] for n in ("neg", "pos")] for p in got], want,
                               atol=1e-4, rtol=0)
    assert [p["label"] for p in got] == [("neg", "pos")[i] for i in want.argmax(1)]


def test_int8_serves_the_quantized_export(trained):
    run, folder = trained
    direct = OnnxModel(folder, name="model.int8.onnx").outputs(TEXTS, None)
    with Server(folder, int8=True) as url:
        assert httpx.get(f"{url}/health").json()["file"] == "model.int8.onnx"
        got = httpx.post(f"{url}/predict", json={"texts": TEXTS}).json()["predictions"]
    np.testing.assert_allclose([[p["probabilities"][n] for n in ("neg", "pos")] for p in got], softmax(direct),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("which, words", [("export", "export the run again with --quantize int8"),
                                          ("run", "is a run folder; serve its export")])
def test_int8_without_an_int8_model_is_one_error_line(trained, tmp_path, which, words):
    from click.testing import CliRunner

    from conftest import one_error_line
    from sherl_pipe.cli import main

    run, folder = trained
    if which == "export":  # an export written without --quantize int8
        path = tmp_path / "fp32-only"
        path.mkdir()
        for f in folder.iterdir():
            if f.name != "model.int8.onnx" and f.is_file():
                (path / f.name).write_bytes(f.read_bytes())
    else:
        path = run
    one_error_line(CliRunner().invoke(main, ["serve", str(path), "--int8", "--port", str(free_port())]), words)


@pytest.mark.parametrize("body, status, words", [
    (b"not json", 400, "not JSON"),
    (b'{"sentences": ["a"]}', 400, "one field"),
    (b'{"texts": "a"}', 400, "non-empty list"),
    (b'{"texts": []}', 400, "non-empty list"),
    (b'{"texts": ["a", 3]}', 400, "row 1 holds a int"),
    (b'{"texts": ["good", "  "]}', 422, "row 1 is empty"),
    (b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "at most 4"),
    (b'{"pairs": [["a", "b"]]}', 400, "trained on single texts"),
])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(trained, body, status, words):
    with Server(trained[1], max_batch=4) as url:
        r = httpx.post(f"{url}/predict", content=body)
        assert r.status_code == status and words in r.json()["error"] and "\n" not in r.json()["error"]
        assert httpx.post(f"{url}/predict", json={"texts": ["good"]}).status_code == 200
        assert httpx.get(f"{url}/nothing").status_code == 404


def test_64_concurrent_clients_are_all_answered_in_batches(trained):
    run, folder = trained
    texts = [f"good film {'bad ' * (i % 5)}" for i in range(64)]

    async def clients(url):
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/predict", json={"texts": [t]}) for t in texts))

    with Server(folder, max_batch=16, max_wait_ms=50) as url:
        answers = asyncio.run(clients(url))
    assert all(r.status_code == 200 for r in answers)
    got = np.array([[r.json()["predictions"][0]["probabilities"][n] for n in ("neg", "pos")] for r in answers])
    np.testing.assert_allclose(got, probabilities(run, texts), atol=1e-4, rtol=0)


def test_ctrl_c_stops_the_server_cleanly(trained):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sherl_pipe", "serve", str(trained[1]), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "serving" in err


def test_a_port_in_use_is_one_error_line(trained):
    from click.testing import CliRunner

    from conftest import one_error_line
    from sherl_pipe.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        one_error_line(CliRunner().invoke(main, ["serve", str(trained[1]), "--port", str(s.getsockname()[1])]),
                       "in use")
