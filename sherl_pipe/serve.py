"""`sherl-pipe serve RUN_OR_EXPORT`: a trained model over HTTP, with request batching.

Starlette under uvicorn: the ASGI stack FastAPI is built on, well kept, and all two endpoints need
(no schema library: the requests are checked here, each fault one line of JSON):

  POST /predict  {"texts": [...]} or {"pairs": [[a, b], ...]}  ->  per row its label and the
                 class probabilities (classification), or its value (regression)
  GET  /health   {"status": "ok", ...}

Requests are gathered into batches of at most --max-batch rows, or what has come within
--max-wait-ms of the first, and run one batch at a time on a worker thread: by ONNX Runtime on an
export folder (`sherl-pipe export`; its model.int8.onnx with --int8), by the run's own model
(`predict`'s path) on a run folder.
A request of more rows than --max-batch is refused (413). Ctrl-C stops the server cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sherl_pipe.errors import SherlError


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- the model behind the server ---------------------------------------------------------------

class OnnxModel:
    """An export folder run by ONNX Runtime, with the tokenizer in it."""

    def __init__(self, folder: Path, threads: int = 0, name: str = "model.onnx", options=None):
        """OPTIONS: ONNX Runtime's SessionOptions to start from (a profiler's, say)."""
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.info = json.loads((folder / "labels.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        options = options or ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.description = {"model": str(folder), "file": name, "runtime": "onnxruntime"}

    def outputs(self, texts: list[str], pairs: list[str] | None) -> np.ndarray:
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.info["max_length"],
                             return_tensors="np")
        feed = {k: (enc[k] if k in enc else np.zeros_like(enc["input_ids"])).astype(np.int64) for k in self.inputs}
        return self.session.run(["logits"], feed)[0]


class RunModel:
    """A run folder, as `predict` runs it (the backbone's early layers live, then stage two)."""

    def __init__(self, run: Path):
        import torch

        from sherl_pipe.export_card import labels_file
        from sherl_pipe.prediction import Predictor

        self.predictor = Predictor.load(run)
        self.info = labels_file(self.predictor.trained)
        self.description = {"model": str(run), "runtime": f"torch {torch.__version__}"}

    def outputs(self, texts: list[str], pairs: list[str] | None) -> np.ndarray:
        return self.predictor.outputs(texts, pairs).numpy()


def open_model(path: str, threads: int = 0, int8: bool = False):
    """INT8: an export's model.int8.onnx (`export --quantize int8`) instead of its model.onnx."""
    folder = Path(path)
    if (folder / "model.onnx").is_file() and (folder / "labels.json").is_file():
        if int8 and not (folder / "model.int8.onnx").is_file():
            raise SherlError(f"--int8: {path} has no model.int8.onnx; export the run again with --quantize int8")
        return OnnxModel(folder, threads, "model.int8.onnx" if int8 else "model.onnx")
    from sherl_pipe.training.checkpoint import is_run_folder

    if folder.is_dir() and is_run_folder(folder):
        if int8:
            raise SherlError(f"--int8: {path} is a run folder; serve its export (sherl-pipe export RUN OUT "
                             f"--quantize int8)")
        return RunModel(folder)
    raise SherlError(f"RUN_OR_EXPORT {path}: neither an export folder (model.onnx and labels.json) nor a run folder")


# --- requests ----------------------------------------------------------------------------------

def parse_rows(body: bytes, max_rows: int, pairs_allowed: bool) -> tuple[list[str], list[str] | None]:
    """(texts, pairs or None) of a request body, or BadRequest naming the fault in one line."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "the body is not JSON; send {\"texts\": [...]} or {\"pairs\": [[a, b], ...]}") from None
    if not isinstance(data, dict) or len(set(data) & {"texts", "pairs"}) != 1 or set(data) - {"texts", "pairs"}:
        raise BadRequest(400, "send one field: {\"texts\": [...]} or {\"pairs\": [[a, b], ...]}")
    key = next(iter(data))
    rows = data[key]
    if not isinstance(rows, list) or not rows:
        raise BadRequest(400, f"{key}: give a non-empty list")
    if len(rows) > max_rows:
        raise BadRequest(413, f"{key}: {len(rows)} rows; at most {max_rows} a request (--max-batch)")
    if key == "pairs":
        if not pairs_allowed:
            raise BadRequest(400, "pairs: this model was trained on single texts; send {\"texts\": [...]}")
        if not all(isinstance(p, list) and len(p) == 2 for p in rows):
            raise BadRequest(400, "pairs: each row is a list of two texts, [a, b]")
        flat = [t for p in rows for t in p]
    else:
        flat = rows
    for i, text in enumerate(flat):
        if not isinstance(text, str):
            raise BadRequest(400, f"{key}: row {i // 2 if key == 'pairs' else i} holds a {type(text).__name__}, not text")
        if not text.strip():
            raise BadRequest(422, f"{key}: row {i // 2 if key == 'pairs' else i} is empty")
    if key == "pairs":
        return [p[0] for p in rows], [p[1] for p in rows]
    return rows, None


def answer(info: dict, logits: np.ndarray) -> list[dict]:
    if info["task"] == "regression":
        return [{"value": float(v)} for v in logits[:, 0]]
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    probs = shifted / shifted.sum(1, keepdims=True)
    names = info["labels"]
    return [{"label": names[int(p.argmax())], "probabilities": {n: float(x) for n, x in zip(names, p)}} for p in probs]


# --- batching ----------------------------------------------------------------------------------

@dataclass
class Pending:
    texts: list[str]
    pairs: list[str] | None
    done: asyncio.Future = field(default=None)


class Batcher:
    """Gathers requests into batches (rows of single texts and of pairs are never mixed) and runs
    each on one worker thread, so the model sees one batch at a time."""

    def __init__(self, model, max_batch: int, max_wait_ms: float):
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sherl-serve")
        self.task: asyncio.Task | None = None

    async def submit(self, texts: list[str], pairs: list[str] | None) -> np.ndarray:
        item = Pending(texts, pairs, asyncio.get_running_loop().create_future())
        await self.queue.put(item)
        return await item.done

    async def run(self) -> None:
        held: Pending | None = None
        while True:
            first = held or await self.queue.get()
            batch, held = [first], None
            rows, deadline = len(first.texts), time.monotonic() + self.max_wait
            while rows < self.max_batch:
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    break
                if rows + len(nxt.texts) > self.max_batch or (nxt.pairs is None) != (first.pairs is None):
                    held = nxt  # starts the next batch
                    break
                batch.append(nxt)
                rows += len(nxt.texts)
            await self.run_batch(batch)

    async def run_batch(self, batch: list[Pending]) -> None:
        texts = [t for p in batch for t in p.texts]
        pairs = None if batch[0].pairs is None else [t for p in batch for t in p.pairs]
        try:
            out = await asyncio.get_running_loop().run_in_executor(self.pool, self.model.outputs, texts, pairs)
        except Exception as exc:  # the model's failure answers these requests, and the server goes on
            for p in batch:
                p.done.set_exception(exc)
            return
        start = 0
        for p in batch:
            p.done.set_result(out[start:start + len(p.texts)])
            start += len(p.texts)


# --- the app -----------------------------------------------------------------------------------

def make_app(model, max_batch: int = 32, max_wait_ms: float = 10.0):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    batcher = Batcher(model, max_batch, max_wait_ms)
    pairs_allowed = model.info["pairs"]

    async def predict(request):
        try:
            texts, pairs = parse_rows(await request.body(), max_batch, pairs_allowed)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        try:
            logits = await batcher.submit(texts, pairs)
        except Exception as exc:
            return JSONResponse({"error": f"the model failed on this batch: {type(exc).__name__}: {exc}"},
                                status_code=500)
        return JSONResponse({"predictions": answer(model.info, logits)})

    async def health(request):
        return JSONResponse({"status": "ok", **model.description, "task": model.info["task"],
                             "max_batch": max_batch, "max_wait_ms": max_wait_ms})

    async def not_found(request, exc):
        return JSONResponse({"error": f"{request.method} {request.url.path}: no such endpoint; POST /predict or "
                                      f"GET /health"}, status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.task = asyncio.get_running_loop().create_task(batcher.run())
        try:
            yield
        finally:
            batcher.task.cancel()
            batcher.pool.shutdown(wait=False, cancel_futures=True)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})


def serve(path: str, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 32, max_wait_ms: float = 10.0,
          threads: int = 0, log=print, int8: bool = False) -> None:
    """Serve RUN_OR_EXPORT until Ctrl-C (uvicorn's own shutdown: requests in flight are answered)."""
    import uvicorn

    with socket.socket() as probe:  # a port in use is one error line, before the model loads
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    model = open_model(path, threads, int8)
    app = make_app(model, max_batch, max_wait_ms)
    log(f"serving {path} ({model.description.get('file', 'run folder')}, {model.description['runtime']}) on http://{host}:{port}: POST /predict, GET /health")
    uvicorn.run(app, host=host, port=port, log_level="warning")
