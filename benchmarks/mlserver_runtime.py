"""A minimal onnxruntime runtime for MLServer, for `aigis bench --infer --mlserver` only.

Runs inside MLServer's own virtual environment (benchmarks/mlserver.py installs it there), never
inside aigis's: it imports MLServer and onnxruntime, nothing of aigis. It does what aigis does with a
model, so the comparison is of the servers, not the runtimes: one session (one intra-op thread,
sequential execution), inputs decoded with MLServer's NumpyCodec, `session.run` on a 2-thread pool —
or directly on the event loop when the model is cheap (a trial run of 50 µs or less, the same rule
aigis applies), outputs encoded with NumpyCodec (raw contents on the gRPC side).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

INLINE_MAX_SECONDS = 50e-6
_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(uri, sess_options=options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="onnx")
        trial: dict[str, np.ndarray] = {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape],
                                  dtype=_NUMPY.get(i.type, np.float32)) for i in self._session.get_inputs()}
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            self._session.run(self._outputs, trial)
            timings.append(time.perf_counter() - started)
        self._inline_max = sum(a.size for a in trial.values()) if sorted(timings)[2] <= INLINE_MAX_SECONDS else 0
        self.ready = True
        return self.ready

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed: dict[str, Any] = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        if sum(a.size for a in feed.values()) <= self._inline_max:
            values = self._session.run(self._outputs, feed)
        else:
            loop = asyncio.get_running_loop()
            values = await loop.run_in_executor(self._executor, self._session.run, self._outputs, feed)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name, np.asarray(value))
                     for name, value in zip(self._outputs, values, strict=True)],
        )
