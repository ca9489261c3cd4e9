"""The engine seam, without Serve and without a model: the Serve replica (ModelServer) and the
chat and job routes' bodies (Chat, JobApi) driven with a test double behind the ServingEngine
protocol, as Ray's LLMServer tests inject a mock engine. The HTTP tests (test_serve.py,
test_vllm.py) keep the contract with the real engines; these hold the logic, in seconds."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from types import SimpleNamespace

import pytest

from medray.engines import ENGINES, Answer, RequestRejected
from medray.engines.protocol import BatchEngine, ServingEngine
from medray.models import get_family
from medray.serve.chat import Chat
from medray.serve.config import ServeConfig
from medray.serve.job_api import JobApi
from medray.serve.local import LocalHandle
from medray.serve.model import ModelServer
from medray.serve.openai_api import ApiError, ChatRequest


class FakeEngine:
    """Answers "echo <the last user text>"; the text chooses a behaviour: "reject" is the
    request's fault, "boom" the engine's, "slow" waits until cancelled, "hold" until `release`."""

    family = get_family("llava-mistral")
    made: list[FakeEngine] = []

    def __init__(self, spec, report):
        self.spec, self.report = spec, report
        self.calls: list[tuple] = []
        self.closed = 0
        self.cancelled = 0
        self.release = asyncio.Event()
        FakeEngine.made.append(self)

    def _text(self, request, settings, adapter, deadline) -> str:
        self.calls.append((request, settings, adapter, deadline))
        text = request.messages[-1]["content"][-1]["text"]
        if "reject" in text:
            raise RequestRejected("the prompt is over max_model_len")
        if "boom" in text:
            raise RuntimeError("CUDA out of memory")
        return f"echo {text}"

    async def _wait(self, text: str) -> None:
        try:
            if "slow" in text:
                await asyncio.sleep(60)
            if "hold" in text:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def generate(self, request, settings, adapter, deadline) -> Answer:
        text = self._text(request, settings, adapter, deadline)
        await self._wait(text)
        return Answer(text, 3, len(text.split()), "stop")

    async def stream(self, request, settings, adapter, deadline):
        try:
            text = self._text(request, settings, adapter, deadline)
            head, _, tail = text.partition(" ")
            yield [head[:2], head[2:]]  # two events of one message: merged by the replica
            await self._wait(text)
            yield [" " + tail, Answer(text, 3, 2, "stop")]
        finally:
            self.closed += 1

    def state(self) -> dict:
        return {"adapters": {"configured": sorted(self.spec.adapters), "resident": [], "loads": 0}}

    def gauges(self) -> dict:
        return {"engine_waiting": 0}

    def recent_batch_sizes(self) -> list[int]:
        return [1]

    def shutdown(self) -> None:
        pass


def _config(tmp_path, **model) -> ServeConfig:
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llava"}))
    return ServeConfig.model_validate({"models": [{"name": "m", "uri": str(model_dir), **model}]})


class _MetricsHandle:
    def __init__(self):
        self.record = SimpleNamespace(remote=self._record)
        self.sent: list = []

    async def _record(self, requests, models):
        self.sent.extend(models)


def _user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def test_the_replica_keeps_the_books_for_any_engine(tmp_path):
    """What ModelServer does for every engine: the in-flight count while a request runs, the
    deadline from the request's time limit, metrics with the engine's gauges, a stream's
    events merged into messages, an engine's error raised, and a stream closed early closing
    the engine's (which stops generating) and leaving nothing in flight."""
    from medray.engines import GenerationSettings, Request

    spec = _config(tmp_path).models[0].model_dump()
    settings = GenerationSettings()

    async def scenario():
        metrics = _MetricsHandle()
        server = ModelServer(spec, metrics, engine_cls=FakeEngine)
        engine = server.engine
        info = server.info()
        assert (info["family"], info["kind"], info["engine"], info["ongoing"]) == ("llava-mistral", "vlm", "hf", 0)
        assert info["digests"]["model"] and info["adapters"]["configured"] == []

        before = time.monotonic()
        task = asyncio.ensure_future(server.generate(Request([_user("hold on")], []), settings, None, 30.0))
        await asyncio.sleep(0.01)
        assert server.ongoing == 1 and server.info()["ongoing"] == 1
        engine.release.set()
        answer = await task
        assert answer.text == "echo hold on" and server.ongoing == 0
        deadline = engine.calls[-1][3]
        assert before + 30 <= deadline <= time.monotonic() + 30

        messages = [m async for m in server.stream(Request([_user("hi")], []), settings, "x", None)]
        assert messages[0] == ["echo"]  # "ec" + "ho": one message, text merged
        assert messages[1][0] == " hi" and messages[1][1].text == "echo hi"
        assert engine.calls[-1][2] == "x" and engine.calls[-1][3] is None and engine.closed == 1

        with pytest.raises(RequestRejected, match="max_model_len"):
            [m async for m in server.stream(Request([_user("reject")], []), settings, None, None)]
        with pytest.raises(RuntimeError, match="CUDA"):
            await server.generate(Request([_user("boom")], []), settings, None, None)

        engine.release.clear()
        stream = server.stream(Request([_user("hold")], []), settings, None, None)
        assert await stream.__anext__() == ["echo"]
        assert server.ongoing == 1
        await stream.aclose()  # the client went away
        assert engine.closed == 3 and server.ongoing == 0

        sent = server.metrics.models
        assert any(m.get("queue_depth") == 1 for m in sent) and sent[-1]["queue_depth"] == 0
        assert all(m["engine_waiting"] == 0 and m["model"] == "m" for m in sent)
        assert sum(m.get("generated_tokens", 0) for m in sent) == 3 + 2  # one answer ("echo hold on"), one stream
        assert server.recent_batch_sizes() == [1]

    asyncio.run(scenario())


def test_chat_answers_and_maps_every_failure_without_serve(tmp_path):
    """Chat's logic on a replica in this process: the OpenAI answer and stream, the digest
    header, and each failure as the client sees it (400 the request's fault, 500 the server's,
    504 past the time limit with the call cancelled, 404 an unknown model), before any model
    time where the request itself is wrong."""
    config = _config(tmp_path, request_timeout_s=0.3)
    FakeEngine.made.clear()

    async def scenario():
        server = ModelServer(config.models[0].model_dump(), engine_cls=FakeEngine)
        chat = Chat(config, {"m": LocalHandle(server)})
        assert await chat.readiness() == {"m": True}

        response = await chat.complete(ChatRequest(model="m", messages=[_user("what is shown?")], max_tokens=8))
        body = json.loads(response.body)
        assert body["choices"][0]["message"]["content"] == "echo what is shown?"
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        assert response.headers["X-Medray-Model-Digest"] == server.digests["model"]
        request, settings, adapter, limit = FakeEngine.made[0].calls[-1]
        assert settings.max_new_tokens == 8 and adapter is None

        streamed = await chat.complete(ChatRequest(model="m", messages=[_user("hi")], stream=True,
                                                   stream_options={"include_usage": True}))
        lines = [line async for chunk in streamed.body_iterator for line in chunk.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[6:]) for line in lines[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in events if c["choices"])
        assert text == "echo hi" and events[-1]["usage"]["completion_tokens"] == 2

        async def error(text: str, **fields) -> ApiError:
            try:
                await chat.complete(ChatRequest(model=fields.pop("model", "m"), messages=[_user(text)], **fields))
            except ApiError as e:
                return e
            raise AssertionError(f"{text!r} was answered")

        rejected = await error("reject this")
        assert rejected.status == 400 and "max_model_len" in rejected.message
        fault = await error("boom")
        assert fault.status == 500 and fault.kind == "server_error" and "not at fault" in fault.message
        slow = await error("slow")
        assert slow.status == 504 and slow.code == "timeout" and "within 0.3 s" in slow.message
        await asyncio.sleep(0.05)
        assert FakeEngine.made[0].cancelled == 1  # the ingress's cancel reached the engine
        assert (await error("x", model="nope")).status == 404
        calls = len(FakeEngine.made[0].calls)
        bad = await error("x", max_tokens=513)  # over the server's limits.max_tokens (512)
        assert bad.status == 400 and bad.param == "max_tokens"
        assert (await error("x", n=2)).param == "n"
        assert len(FakeEngine.made[0].calls) == calls  # refused before the replica was asked
        assert server.ongoing == 0

    asyncio.run(scenario())


def test_job_routes_refuse_what_the_server_does_not_allow(tmp_path):
    """JobApi's checks, before anything is stored or started: no job store configured, an
    output or input outside the allowed prefixes (403 naming the field), too many tokens."""
    config = _config(tmp_path)
    jobs = {"store": str(tmp_path / "jobs"), "allowed_input_prefixes": [str(tmp_path / "in")],
            "allowed_output_prefixes": [str(tmp_path / "out")], "max_new_tokens": 32,
            "allowed_dicomweb_servers": ["dicomweb://pacs:8042/dicom-web"]}
    with_jobs = ServeConfig.model_validate({**config.model_dump(), "jobs": jobs})
    from medray.serve.jobs import JobRequest

    async def scenario():
        chat = Chat(with_jobs, {})
        api = JobApi(with_jobs, chat.model)
        good = {"model": "m", "input": str(tmp_path / "in"), "output": str(tmp_path / "out" / "run")}
        for field, value in (("output", str(tmp_path / "elsewhere")), ("input", "s3://other/scans/"),
                             ("image_folder", str(tmp_path / "secret")),
                             ("input", "dicomweb://other-pacs:8042/dicom-web?Modality=CT")):
            with pytest.raises(ApiError) as e:
                await api.submit(JobRequest(**{**good, field: value}))
            assert (e.value.status, e.value.param) == (403, field)
        assert "other-pacs:8042/dicom-web is not on an allowed DICOMweb server" in e.value.message  # the PACS named, and what is
        with pytest.raises(ApiError) as e:
            await api.submit(JobRequest(**good, max_new_tokens=64))
        assert (e.value.status, e.value.param) == (400, "max_new_tokens")
        with pytest.raises(ApiError) as e:
            await api.submit(JobRequest(**{**good, "model": "nope"}))
        assert e.value.status == 404
        assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").rglob("*.json"))
        assert (await api.list(20, None))["data"] == []

        without = JobApi(config, Chat(config, {}).model)
        assert (await without.health())["available"] is False
        with pytest.raises(ApiError) as e:
            await without.list(20, None)
        assert e.value.status == 404 and "not configured" in e.value.message

    asyncio.run(scenario())


def test_every_registered_engine_has_the_declared_shape():
    """Adding an engine is a module and a registry line: whatever the registry names must have
    the protocols' methods, its loader the shared signature, and its options a field on both
    configs that carry them. Imports the engine modules only (not torch's model code, not vLLM)."""
    from typing import get_args, get_type_hints

    from medray.engines import EngineName
    from medray.infer import InferConfig
    from medray.serve.config import ModelSpec

    assert set(get_args(EngineName)) == set(ENGINES)
    serving_methods = {n for n, v in vars(ServingEngine).items() if callable(v) and not n.startswith("_")}
    assert serving_methods == {"generate", "stream", "state", "gauges", "recent_batch_sizes", "shutdown"}
    for name, entry in ENGINES.items():
        cls = entry.serving_class()
        assert serving_methods <= set(dir(cls)), name
        assert inspect.isasyncgenfunction(cls.stream) and inspect.iscoroutinefunction(cls.generate), name
        assert list(inspect.signature(cls.__init__).parameters)[1:3] == ["spec", "report"], name
        load = entry.load_batch()
        assert list(inspect.signature(load).parameters)[:4] == ["model", "adapter", "adapters", "options"], name
        batch_cls = get_type_hints(load)["return"]
        assert callable(batch_cls.generate_encoded) and isinstance(batch_cls.continuous, bool), name
        if entry.options:
            assert entry.options in InferConfig.model_fields and entry.options in ModelSpec.model_fields, name
    assert hasattr(BatchEngine, "generate_encoded")


def test_a_stream_sends_what_is_certain_and_holds_back_only_an_unsettled_end():
    """Both engines' rule for streamed text (engines.types.new_text): a half character at the end
    (U+FFFD, which the next token may complete) and trailing space wait; an invalid byte inside
    the text is final and does not hold back what follows it (a random-weight model emits them:
    holding all after one back streamed whole answers as one chunk)."""
    from medray.engines.types import new_text

    sent, deltas = "", []
    for text in ["ab", "ab \ufffd", "ab \ufffdcd", "ab \ufffdcd  ", "ab \ufffdcd e", "ab \ufffdcd ef"]:
        delta = new_text(text, sent)
        deltas.append(delta)
        sent += delta
    assert deltas == ["ab", "", " \ufffdcd", "", " e", "f"]
    assert sent == "ab \ufffdcd ef"
    assert new_text("abcdef", "ab", hold=2) == "cd"  # a stop string of 3 characters may be starting
    assert new_text("xy", "ab") == ""  # text that no longer starts with what was sent: wait
    # vLLM's text grows by whole characters (its detokenizer holds half ones back): a U+FFFD
    # at its end is final, sent at once; trailing space still waits.
    assert new_text("ab\ufffd", "ab", whole_chars=True) == "\ufffd"
    assert new_text("ab\ufffd ", "ab", whole_chars=True) == "\ufffd"
