"""Dynamic batching: when batches are dispatched, that answers are the same bits as unbatched, errors,
cancellation, the bounded queue, close(), the [batching] table, the benchmark CNN, and end to end.

The model is always the real one; where a test needs to hold a batch running (to fill the queue) or
make one fail, it wraps the real model's `predict` — the batcher cannot tell the difference.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from calls import bearer, channel, issuer_token
from onnx import TensorProto, helper
from PIL import Image

from aigis.classifier.v1 import classifier_pb2 as cls
from aigis.classifier.v1 import classifier_pb2_grpc as cls_grpc
from aigis.server import images
from aigis.server.batching import BatcherClosed, DynamicBatcher, executor_workers
from aigis.server.classifier import ImageClassificationServicer
from aigis.server.errors import ResourceExhausted
from aigis.server.model import BatchingConfig, ModelConfig, ModelConfigError, ModelRegistry, OnnxClassifier
from aigis.tools import make_cnn, train_digits

DIGITS_DIR = Path(__file__).resolve().parent.parent / "server" / "models" / "digits"
LONG = 10_000_000  # µs: a delay no test waits out, so only a full batch can dispatch
BOUND = 5.0  # seconds: the most any await in these tests may take


@pytest.fixture(scope="module")
def digits() -> OnnxClassifier:
    return OnnxClassifier.load(DIGITS_DIR)


@pytest.fixture(scope="module")
def heldout_rows(digits: OnnxClassifier) -> np.ndarray:
    pixels, _ = train_digits.heldout_split()
    return images.pixels_to_input(pixels, digits.config)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-batch") as pool:
        yield pool


def batcher(model: OnnxClassifier, executor: ThreadPoolExecutor, *, predict: Callable[[np.ndarray], np.ndarray]
            | None = None, max_in_flight: int = 1, **settings: Any) -> DynamicBatcher:
    return DynamicBatcher(predict or model.predict, BatchingConfig(enabled=True, **settings), executor,
                          row_shape=model.config.input_shape(1)[1:], max_in_flight=max_in_flight, name=model.name)


class Gate:
    """Wraps the real predict so the first batch holds its executor thread until `release`."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray]) -> None:
        self._predict = predict
        self.entered = threading.Event()
        self._open = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if not self.entered.is_set():
            self.entered.set()
            assert self._open.wait(BOUND), "gate was never released"
        return self._predict(batch)

    def release(self) -> None:
        self._open.set()


async def bounded(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, BOUND)


async def wait_entered(gate: Gate) -> None:
    assert await asyncio.to_thread(gate.entered.wait, BOUND), "the first batch never started"


# --- when a batch is dispatched --------------------------------------------------------------------


def test_full_batch_is_dispatched_without_waiting_for_the_delay(digits: OnnxClassifier, executor: ThreadPoolExecutor,
                                                                 heldout_rows: np.ndarray) -> None:
    """max_batch_size queued requests run at once as one batch, though the delay is 10 s."""
    b = batcher(digits, executor, max_batch_size=4, max_queue_delay_us=LONG)

    async def scenario() -> list[np.ndarray]:
        return await bounded(asyncio.gather(*(b.submit(row) for row in heldout_rows[:4])))

    started = time.monotonic()
    results = asyncio.run(scenario())
    assert time.monotonic() - started < BOUND
    assert b.stats().sizes == {4: 1}
    np.testing.assert_array_equal(np.stack(results), digits.predict(heldout_rows[:4]))


def test_partial_batch_is_dispatched_when_the_oldest_has_waited_the_delay(
        digits: OnnxClassifier, executor: ThreadPoolExecutor, heldout_rows: np.ndarray) -> None:
    """Fewer than max_batch_size requests wait max_queue_delay_us (20 ms), then run as one batch."""
    b = batcher(digits, executor, max_batch_size=32, max_queue_delay_us=20_000)

    async def scenario() -> float:
        started = asyncio.get_running_loop().time()
        await bounded(asyncio.gather(*(b.submit(row) for row in heldout_rows[:3])))
        return asyncio.get_running_loop().time() - started

    waited = asyncio.run(scenario())
    assert 0.020 <= waited < BOUND
    assert b.stats().sizes == {3: 1}


def test_zero_delay_runs_a_lone_request_at_once_and_batches_while_busy(
        digits: OnnxClassifier, executor: ThreadPoolExecutor, heldout_rows: np.ndarray) -> None:
    """With delay 0 the first request runs alone at once; the rest, queued while it runs, form one batch."""
    b = batcher(digits, executor, max_batch_size=32, max_queue_delay_us=0, max_in_flight=1)

    async def scenario() -> None:
        await bounded(asyncio.gather(*(b.submit(row) for row in heldout_rows[:10])))

    asyncio.run(scenario())
    assert b.stats().sizes == {1: 1, 9: 1}


def test_queue_longer_than_a_batch_is_split_at_max_batch_size(
        digits: OnnxClassifier, executor: ThreadPoolExecutor, heldout_rows: np.ndarray) -> None:
    """Requests queued behind a running batch leave in batches of max_batch_size, oldest first."""
    gate = Gate(digits.predict)
    b = batcher(digits, executor, predict=gate, max_batch_size=4, max_queue_delay_us=0, max_in_flight=1)

    async def scenario() -> list[np.ndarray]:
        first = asyncio.ensure_future(b.submit(heldout_rows[0]))
        await wait_entered(gate)
        rest = asyncio.gather(*(b.submit(row) for row in heldout_rows[1:11]))
        await asyncio.sleep(0)
        assert b.stats().queued == 10
        gate.release()
        return [await bounded(first), *await bounded(rest)]

    results = asyncio.run(scenario())
    assert b.stats().sizes == {1: 1, 2: 1, 4: 2}
    np.testing.assert_array_equal(np.stack(results), digits.predict(heldout_rows[:11]))


def test_batches_in_flight_are_capped(digits: OnnxClassifier, executor: ThreadPoolExecutor,
                                      heldout_rows: np.ndarray) -> None:
    """No more than max_in_flight batches run at once; the next one waits in the queue."""
    gate = Gate(digits.predict)
    b = batcher(digits, executor, predict=gate, max_batch_size=1, max_queue_delay_us=0, max_in_flight=1)

    async def scenario() -> None:
        pending = asyncio.gather(*(b.submit(row) for row in heldout_rows[:3]))
        await wait_entered(gate)
        assert (b.stats().in_flight, b.stats().queued) == (1, 2)
        gate.release()
        await bounded(pending)

    asyncio.run(scenario())
    assert b.stats().sizes == {1: 3}
    assert executor_workers(executor) == 2


# --- same answers as unbatched -------------------------------------------------------------------


def test_batched_digits_are_bit_identical_to_unbatched(digits: OnnxClassifier, executor: ThreadPoolExecutor,
                                                       heldout_rows: np.ndarray) -> None:
    """Every held-out digit gets exactly the float32 probabilities it gets alone, in whatever batch."""
    alone = np.concatenate([digits.predict(row[np.newaxis]) for row in heldout_rows])
    b = batcher(digits, executor, max_batch_size=32, max_queue_delay_us=1000, max_queue_size=512, max_in_flight=2)

    async def scenario() -> list[np.ndarray]:
        return await bounded(asyncio.gather(*(b.submit(row) for row in heldout_rows)))

    batched = np.stack(asyncio.run(scenario()))
    assert max(b.stats().sizes) > 1  # it really batched
    assert batched.tobytes() == alone.tobytes()
    for size in (2, 7, 32, len(heldout_rows)):  # and any batch size, directly
        chunks = [digits.predict(heldout_rows[i:i + size]) for i in range(0, len(heldout_rows), size)]
        assert np.concatenate(chunks).tobytes() == alone.tobytes()


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory: pytest.TempPathFactory) -> OnnxClassifier:
    out = tmp_path_factory.mktemp("cnn")
    return OnnxClassifier.load(make_cnn.write_cnn(out, name="cnn32", size=32, n_labels=10, hidden=(64, 64)))


def test_batched_cnn_is_bit_identical_to_unbatched(small_cnn: OnnxClassifier, executor: ThreadPoolExecutor) -> None:
    """The benchmark CNN (convolutions, then a fully connected head) gives each image the same bits alone
    or in a batch."""
    rows = np.random.default_rng(7).random(small_cnn.config.input_shape(20), dtype=np.float32)
    alone = np.concatenate([small_cnn.predict(row[np.newaxis]) for row in rows])
    b = batcher(small_cnn, executor, max_batch_size=8, max_queue_delay_us=1000, max_in_flight=2)

    async def scenario() -> list[np.ndarray]:
        return await bounded(asyncio.gather(*(b.submit(row) for row in rows)))

    assert np.stack(asyncio.run(scenario())).tobytes() == alone.tobytes()
    assert small_cnn.predict(rows).tobytes() == alone.tobytes()


# --- failures ------------------------------------------------------------------------------------


class BrokenModel(RuntimeError):
    pass


def test_an_exception_fails_every_request_of_its_batch_only(digits: OnnxClassifier, executor: ThreadPoolExecutor,
                                                            heldout_rows: np.ndarray) -> None:
    """A batch whose run raises fails each of its requests with that exception; other batches answer."""
    gate = Gate(digits.predict)

    def predict(batch: np.ndarray) -> np.ndarray:
        if len(batch) == 3:
            raise BrokenModel("the model broke")
        return gate(batch)

    b = batcher(digits, executor, predict=predict, max_batch_size=3, max_queue_delay_us=0, max_in_flight=1)

    async def scenario() -> list[object]:
        first = asyncio.ensure_future(b.submit(heldout_rows[0]))
        await wait_entered(gate)
        doomed = [asyncio.ensure_future(b.submit(row)) for row in heldout_rows[1:4]]
        after = asyncio.ensure_future(b.submit(heldout_rows[4]))  # queued beyond the doomed batch
        await asyncio.sleep(0)
        gate.release()
        return await bounded(asyncio.gather(first, *doomed, after, return_exceptions=True))

    first, *doomed, after = asyncio.run(scenario())
    np.testing.assert_array_equal(first, digits.predict(heldout_rows[:1])[0])
    assert [type(e) for e in doomed] == [BrokenModel] * 3
    assert all(str(e) == "the model broke" for e in doomed)
    np.testing.assert_array_equal(after, digits.predict(heldout_rows[4:5])[0])
    stats = b.stats()
    assert (stats.batches, stats.failed_batches, stats.sizes) == (3, 1, {1: 2, 3: 1})


def test_a_shut_down_executor_fails_the_batch(digits: OnnxClassifier, heldout_rows: np.ndarray) -> None:
    """When the executor refuses work, the batch's requests fail with its error; the loop carries on."""
    pool = ThreadPoolExecutor(max_workers=1)
    pool.shutdown()
    b = batcher(digits, pool, max_batch_size=2, max_queue_delay_us=0)

    async def scenario() -> list[object]:
        return await bounded(asyncio.gather(*(b.submit(row) for row in heldout_rows[:2]), return_exceptions=True))

    outcomes = asyncio.run(scenario())
    assert [type(e) for e in outcomes] == [RuntimeError, RuntimeError]
    assert str(outcomes[0]) == "cannot schedule new futures after shutdown"
    assert b.stats().failed_batches == 2


def test_a_malformed_row_is_refused_alone(digits: OnnxClassifier, executor: ThreadPoolExecutor,
                                          heldout_rows: np.ndarray) -> None:
    """A row of the wrong shape or dtype is refused at submit and never reaches a batch."""
    b = batcher(digits, executor, max_batch_size=2, max_queue_delay_us=LONG)

    async def scenario() -> None:
        for bad in (heldout_rows[0][:63], heldout_rows[0].astype(np.float64), heldout_rows[:1]):
            with pytest.raises(ValueError, match=r"^row must be float32 shaped \(64,\), got "):
                await b.submit(bad)
        await bounded(asyncio.gather(*(b.submit(row) for row in heldout_rows[:2])))

    asyncio.run(scenario())
    assert b.stats().sizes == {2: 1}


def test_a_cancelled_request_is_dropped_from_its_batch(digits: OnnxClassifier, executor: ThreadPoolExecutor,
                                                       heldout_rows: np.ndarray) -> None:
    """A caller that goes away before its batch runs does not take a place in it."""
    b = batcher(digits, executor, max_batch_size=3, max_queue_delay_us=LONG)

    async def scenario() -> list[np.ndarray]:
        tasks = [asyncio.ensure_future(b.submit(row)) for row in heldout_rows[:2]]
        await asyncio.sleep(0)
        tasks[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        assert b.stats().queued == 1
        more = [asyncio.ensure_future(b.submit(row)) for row in heldout_rows[2:4]]
        return await bounded(asyncio.gather(tasks[1], *more))

    results = asyncio.run(scenario())
    stats = b.stats()
    assert (stats.sizes, stats.cancelled) == ({3: 1}, 1)
    np.testing.assert_array_equal(np.stack(results), digits.predict(heldout_rows[1:4]))


def test_a_request_cancelled_while_its_batch_runs_leaves_the_others_intact(
        digits: OnnxClassifier, executor: ThreadPoolExecutor, heldout_rows: np.ndarray) -> None:
    """Cancelling during the run only drops that caller's row of the result."""
    gate = Gate(digits.predict)
    b = batcher(digits, executor, predict=gate, max_batch_size=2, max_queue_delay_us=LONG)

    async def scenario() -> np.ndarray:
        tasks = [asyncio.ensure_future(b.submit(row)) for row in heldout_rows[:2]]
        await wait_entered(gate)
        tasks[0].cancel()
        gate.release()
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        return await bounded(tasks[1])

    np.testing.assert_array_equal(asyncio.run(scenario()), digits.predict(heldout_rows[1:2])[0])
    assert b.stats().sizes == {2: 1}


def test_a_full_queue_refuses_with_resource_exhausted(digits: OnnxClassifier, executor: ThreadPoolExecutor,
                                                      heldout_rows: np.ndarray) -> None:
    """Beyond max_queue_size waiting requests, submit raises ResourceExhausted; the queued ones still answer."""
    gate = Gate(digits.predict)
    b = batcher(digits, executor, predict=gate, max_batch_size=2, max_queue_size=3, max_queue_delay_us=0)

    async def scenario() -> list[np.ndarray]:
        first = asyncio.ensure_future(b.submit(heldout_rows[0]))
        await wait_entered(gate)
        queued = [asyncio.ensure_future(b.submit(row)) for row in heldout_rows[1:4]]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted) as caught:
            await b.submit(heldout_rows[4])
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.message == "model 'digits' is overloaded: 3 requests are already waiting; retry later"
        gate.release()
        return await bounded(asyncio.gather(first, *queued))

    results = asyncio.run(scenario())
    np.testing.assert_array_equal(np.stack(results), digits.predict(heldout_rows[:4]))
    assert b.stats().rejected == 1


def test_close_fails_queued_requests_and_refuses_new_ones(digits: OnnxClassifier, executor: ThreadPoolExecutor,
                                                          heldout_rows: np.ndarray) -> None:
    """close() fails waiting requests with UNAVAILABLE, lets the running batch answer, refuses new ones."""
    gate = Gate(digits.predict)
    b = batcher(digits, executor, predict=gate, max_batch_size=1, max_queue_delay_us=0)
    message = "model 'digits' is not accepting requests: the server is shutting down; retry"

    async def scenario() -> list[object]:
        running = asyncio.ensure_future(b.submit(heldout_rows[0]))
        await wait_entered(gate)
        queued = [asyncio.ensure_future(b.submit(row)) for row in heldout_rows[1:3]]
        await asyncio.sleep(0)
        b.close()
        with pytest.raises(BatcherClosed, match=message):
            await b.submit(heldout_rows[3])
        gate.release()
        return await bounded(asyncio.gather(running, *queued, return_exceptions=True))

    running, *queued = asyncio.run(scenario())
    np.testing.assert_array_equal(running, digits.predict(heldout_rows[:1])[0])
    assert [type(e) for e in queued] == [BatcherClosed, BatcherClosed]
    assert all(e.code is grpc.StatusCode.UNAVAILABLE and e.message == message for e in queued)  # type: ignore[union-attr]


# --- the [batching] table --------------------------------------------------------------------------

BASE_TOML = train_digits.config_toml(train_digits.CONFIG)

BAD_BATCHING = [
    pytest.param("enabled = 1", "batching.enabled: must be true or false, got 1", id="enabled-not-bool"),
    pytest.param("max_batch_size = 0", "batching.max_batch_size: must be an integer from 1 to 4096, got 0",
                 id="batch-zero"),
    pytest.param("max_batch_size = 4097", "batching.max_batch_size: must be an integer from 1 to 4096, got 4097",
                 id="batch-huge"),
    pytest.param("max_batch_size = 8.0", "batching.max_batch_size: must be an integer, got 8.0", id="batch-float"),
    pytest.param("max_batch_size = true", "batching.max_batch_size: must be an integer, got True", id="batch-bool"),
    pytest.param("max_queue_delay_us = -1",
                 "batching.max_queue_delay_us: must be an integer from 0 to 10000000, got -1", id="delay-negative"),
    pytest.param("max_queue_delay_us = 10_000_001",
                 "batching.max_queue_delay_us: must be an integer from 0 to 10000000, got 10000001",
                 id="delay-huge"),
    pytest.param('max_queue_delay_us = "1ms"', "batching.max_queue_delay_us: must be an integer, got '1ms'",
                 id="delay-string"),
    pytest.param("max_queue_size = 0", "batching.max_queue_size: must be an integer from 1 to 1000000, got 0",
                 id="queue-zero"),
    pytest.param("max_batch_size = 16\nmax_queue_size = 8",
                 "batching.max_queue_size: must be at least batching.max_batch_size (16), got 8",
                 id="queue-shorter-than-batch"),
    pytest.param("max_queue_delay = 100", "batching.max_queue_delay: unknown key", id="typo"),
    pytest.param("preferred_batch_sizes = [4, 8]", "batching.preferred_batch_sizes: unknown key",
                 id="preferred-sizes-unsupported"),
]


@pytest.mark.parametrize(("table", "message"), BAD_BATCHING)
def test_bad_batching_table_is_refused_naming_file_and_key(tmp_path: Path, table: str, message: str) -> None:
    """An invalid [batching] table stops loading with a message naming the file and the key."""
    path = tmp_path / "model.toml"
    path.write_text(BASE_TOML + "\n[batching]\n" + table + "\n", encoding="utf-8")
    with pytest.raises(ModelConfigError) as caught:
        ModelConfig.from_toml(path)
    assert str(caught.value) == f"{path}: {message}"


def test_batching_not_a_table_is_refused(tmp_path: Path) -> None:
    """`batching = true` instead of a table is refused, naming the key."""
    path = tmp_path / "model.toml"
    path.write_text("batching = true\n" + BASE_TOML, encoding="utf-8")
    with pytest.raises(ModelConfigError) as caught:
        ModelConfig.from_toml(path)
    assert str(caught.value) == f"{path}: batching: must be a table, got True"


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param("", BatchingConfig(), id="absent"),
        pytest.param("[batching]\n", BatchingConfig(), id="empty"),
        pytest.param("[batching]\nenabled = true\n", BatchingConfig(enabled=True), id="enabled-defaults"),
        pytest.param("[batching]\nenabled = true\nmax_batch_size = 8\nmax_queue_delay_us = 250\nmax_queue_size = 64\n",
                     BatchingConfig(True, 8, 250, 64), id="all-keys"),
    ],
)
def test_batching_table_loads(tmp_path: Path, table: str, expected: BatchingConfig) -> None:
    """The table is optional, every key has a default, and batching is off unless enabled."""
    path = tmp_path / "model.toml"
    path.write_text(BASE_TOML + "\n" + table, encoding="utf-8")
    assert ModelConfig.from_toml(path).batching == expected
    assert BatchingConfig() == BatchingConfig(enabled=False, max_batch_size=32, max_queue_delay_us=0,
                                              max_queue_size=256)


def with_batching(model_dir: Path, table: str) -> Path:
    toml = model_dir / "model.toml"
    toml.write_text(toml.read_text(encoding="utf-8") + "\n[batching]\n" + table + "\n", encoding="utf-8")
    return model_dir


def fix_batch_dimension(model_dir: Path) -> None:
    """Rewrite the digits graph so its input's batch dimension is the constant 1."""
    model = onnx.load(model_dir / "model.onnx")
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    onnx.save(model, model_dir / "model.onnx")


def reshape_to_one_image(model_dir: Path) -> None:
    """Keep the symbolic batch dimension but reshape the input to (1, 64) inside the graph."""
    model = onnx.load(model_dir / "model.onnx")
    graph = model.graph
    graph.initializer.append(helper.make_tensor("one_image", TensorProto.INT64, [2], [1, 64]))
    graph.node.insert(0, helper.make_node("Reshape", ["pixels", "one_image"], ["pixels_one"]))
    graph.node[1].input[0] = "pixels_one"
    onnx.save(model, model_dir / "model.onnx")


def mix_rows(model_dir: Path) -> None:
    """Subtract the batch's mean image before the first layer: each answer depends on its batch-mates."""
    model = onnx.load(model_dir / "model.onnx")
    graph = model.graph
    graph.initializer.append(helper.make_tensor("batch_axis", TensorProto.INT64, [1], [0]))
    graph.node.insert(0, helper.make_node("ReduceMean", ["pixels", "batch_axis"], ["batch_mean"]))
    graph.node.insert(1, helper.make_node("Sub", ["pixels", "batch_mean"], ["centred"]))
    graph.node[2].input[0] = "centred"
    onnx.save(model, model_dir / "model.onnx")


@pytest.mark.parametrize(
    ("damage", "table", "message"),
    [
        pytest.param(fix_batch_dimension, "enabled = true\nmax_batch_size = 8",
                     "{model}: batching.enabled: input 'pixels' has a fixed batch dimension 1, but "
                     "batching.max_batch_size is 8; export the model with a dynamic (symbolic) first dimension, "
                     "or set enabled = false", id="fixed-batch-dimension"),
        pytest.param(reshape_to_one_image, "enabled = true",
                     "{model}: batching.enabled: the model fails on a batch of 2 images (", id="graph-fixed-inside"),
        pytest.param(mix_rows, "enabled = true",
                     "{model}: batching.enabled: an image's probabilities change with the other images in its "
                     "batch, so batching would change answers; set enabled = false", id="rows-mix"),
    ],
)
def test_batching_a_model_that_cannot_batch_is_refused(tmp_path: Path, damage: Callable[[Path], None], table: str,
                                                       message: str) -> None:
    """Batching is refused at load for a graph that only takes one image, saying why and what to do."""
    model_dir = shutil.copytree(DIGITS_DIR, tmp_path / "digits")
    damage(model_dir)
    OnnxClassifier.load(model_dir)  # unbatched, the model is fine
    with pytest.raises(ModelConfigError) as caught:
        OnnxClassifier.load(with_batching(model_dir, table))
    assert str(caught.value).startswith(message.format(model=model_dir / "model.onnx"))


def test_fixed_batch_of_one_may_batch_one_at_a_time(tmp_path: Path) -> None:
    """A fixed batch dimension of 1 matches max_batch_size = 1, so that configuration loads."""
    model_dir = shutil.copytree(DIGITS_DIR, tmp_path / "digits")
    fix_batch_dimension(model_dir)
    model = OnnxClassifier.load(with_batching(model_dir, "enabled = true\nmax_batch_size = 1"))
    assert model.config.batching == BatchingConfig(enabled=True, max_batch_size=1)


# --- the benchmark CNN -----------------------------------------------------------------------------


def png(pixels: np.ndarray, mode: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(out, format="PNG")
    return out.getvalue()


def test_cnn_224_loads_in_the_registry_and_classifies_through_the_batcher(tmp_path: Path) -> None:
    """make_cnn writes a 224x224 RGB model the registry loads; its servicer answers batched like unbatched."""
    off = make_cnn.write_cnn(tmp_path / "off")
    on = shutil.copytree(off, tmp_path / "on" / off.name)
    config = make_cnn.cnn_config(batching=BatchingConfig(enabled=True, max_batch_size=3, max_queue_delay_us=LONG))
    (on / "model.toml").write_text(make_cnn.config_toml(config), encoding="utf-8")
    assert (on / "model.toml").read_text(encoding="utf-8").endswith(
        f"[batching]\nenabled = true\nmax_batch_size = 3\nmax_queue_delay_us = {LONG}\nmax_queue_size = 256\n")
    plain, batched = ModelRegistry.load(off.parent), ModelRegistry.load(on.parent)
    model = batched.get("")
    assert (model.name, model.info.input_shape, len(model.labels)) == ("cnn224", (1, 3, 224, 224), 1000)
    assert model.labels[:2] == ("class-0000", "class-0001")
    rng = np.random.default_rng(3)
    requests = [cls.Image(data=png(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), "RGB"), top_k=5)
                for _ in range(6)]

    async def classify(servicer: ImageClassificationServicer) -> list[cls.ClassificationResult]:
        return await bounded(asyncio.gather(*(servicer.ClassifyImage(r, None) for r in requests)))  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=2) as pool:
        unbatched_servicer = ImageClassificationServicer(plain, pool)
        batched_servicer = ImageClassificationServicer(batched, pool)
        assert list(unbatched_servicer.batchers) == [] and list(batched_servicer.batchers) == ["cnn224"]
        expected = asyncio.run(classify(unbatched_servicer))
        got = asyncio.run(classify(batched_servicer))
    assert got == expected
    assert batched_servicer.batchers["cnn224"].stats().sizes == {3: 2}
    assert all(r.model == "cnn224" and len(r.top) == 5 for r in got)


def test_cnn_generator_is_deterministic(tmp_path: Path) -> None:
    """The same arguments write the same bytes (fixed seed, no timestamps)."""
    a = make_cnn.write_cnn(tmp_path / "a", size=32, n_labels=10, hidden=(16,))
    b = make_cnn.write_cnn(tmp_path / "b", size=32, n_labels=10, hidden=(16,))
    for name in ("model.onnx", "labels.txt", "model.toml"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_cnn_cli_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m aigis.tools.make_cnn OUT --batching` writes OUT/<name>/ with batching enabled."""
    assert make_cnn.main([str(tmp_path), "--name", "tiny", "--size", "16", "--labels", "3", "--hidden", "8,4",
                          "--batching", "--max-batch-size", "8", "--max-queue-delay-us", "200"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'tiny'}\n"
    model = OnnxClassifier.load(tmp_path / "tiny")
    assert model.config.batching == BatchingConfig(enabled=True, max_batch_size=8, max_queue_delay_us=200)
    assert model.predict(np.zeros(model.config.input_shape(3), dtype=np.float32)).shape == (3, 3)


# --- end to end --------------------------------------------------------------------------------------


def test_batched_server_answers_64_concurrent_calls_like_unbatched(
        tmp_path: Path, start_stack: Callable[..., Any]) -> None:
    """64 concurrent ClassifyImage calls over mTLS to a batching server each get the unbatched answer."""
    models = tmp_path / "models"
    with_batching(shutil.copytree(DIGITS_DIR, models / "digits"),
                  "enabled = true\nmax_batch_size = 16\nmax_queue_delay_us = 2000")
    stack = start_stack(models=models)
    pixels, _ = train_digits.heldout_split()
    requests = [cls.Image(data=png(p, "L"), top_k=3) if i % 2 else
                cls.Image(data=p.tobytes(), width=8, height=8, top_k=10) for i, p in enumerate(pixels[:64])]
    plain = tmp_path / "plain"
    shutil.copytree(DIGITS_DIR, plain / "digits")
    with ThreadPoolExecutor(max_workers=2) as pool:
        reference = ImageClassificationServicer(ModelRegistry.load(plain), pool)
        expected = [reference._classify(r) for r in requests]  # the unbatched path, in-process
    token = bearer(issuer_token(stack, "demo"))
    with channel(stack, "demo") as ch:
        stub = cls_grpc.ImageClassificationServiceStub(ch)
        calls = [stub.ClassifyImage.future(r, metadata=token, timeout=10) for r in requests]
        answers = [call.result() for call in calls]
    assert answers == expected
