"""compile=True through the engine: the graphs of every row count are compiled when the engine
starts, steps of any number of rows run them (padded to a compiled size), and the codes are the
eager engine's."""

import pytest
import torch
from torch._dynamo.utils import counters

from csm import Generator
from csm.compiled import row_buckets
from csm.engine import Engine, Request
from csm.engine.runner import Runner
from csm.loading import load_for_generation
from tests.product.engine_parts import tiny_mimi


@pytest.fixture(scope="module")
def codec():
    return tiny_mimi()


def test_row_buckets_are_powers_of_two_up_to_the_rows():
    assert row_buckets(1) == [1]
    assert row_buckets(4) == [1, 2, 4]
    assert row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(8) == [1, 2, 4, 8]


def run_staggered(engine: Engine, requests: list[Request]) -> None:
    """Submits the requests one frame apart, so the rows grow 1, 2, 3 (a padded step), then
    shrink as the shorter ones end."""
    handles = []
    for request in requests:
        handles.append(engine.submit(request))
        next(handles[-1])
    for handle in handles:
        list(handle)


def frames_by_request(monkeypatch) -> dict[int, list[torch.Tensor]]:
    """Records every frame the engine decodes, by its request's seed."""
    made: dict[int, list[torch.Tensor]] = {}
    speak = Runner._speak

    def speak_and_record(runner, frames):
        for running, frame in frames:
            made.setdefault(running.stream.request.seed, []).append(frame.clone())
        speak(runner, frames)

    monkeypatch.setattr(Runner, "_speak", speak_and_record)
    return made


def test_every_row_count_runs_a_graph_compiled_at_start_and_gives_the_eager_codes(assets, parts, codec, monkeypatch):
    # Past dynamo's recompile limit a step would quietly run eagerly: make that an error here.
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    eager, tokenizer = parts
    compiled = load_for_generation(assets.model, dtype=torch.float32, compile=True)
    requests = [Request(f"Line number {i}, said.", i % 2, (), (9 - 2 * i) * 80, seed=20 + i) for i in range(3)]
    made = frames_by_request(monkeypatch)

    with Engine(Generator(compiled, codec, tokenizer), max_batch=4) as engine:
        assert set(compiled.compile_seconds) == {
            name
            for rows in (1, 2, 4)
            for name in (f"backbone step x{rows}", f"depth step x{rows} (2 in)", f"depth step x{rows} (1 in)")
        }
        graphs = counters["stats"]["unique_graphs"]
        run_staggered(engine, requests)
        assert counters["stats"]["unique_graphs"] == graphs, "a step compiled while serving"
    compiled_frames = {seed: torch.stack(frames) for seed, frames in made.items()}
    made.clear()

    with Engine(Generator(eager, codec, tokenizer), max_batch=4) as engine:
        run_staggered(engine, requests)
    assert len(compiled_frames) == 3
    for request in requests:
        assert torch.equal(compiled_frames[request.seed], torch.stack(made[request.seed])), request.seed
