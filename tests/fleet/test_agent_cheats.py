"""Cheating agents (fleet.agent.client.Faults' cheats and car-level modes): each result cheat sends a result the
gateway's shape check accepts (fleet.workloads.embedding.vectors_problem) and that is wrong in the way it claims, computed
with the real embedding runtime; the car-level modes send, or leave out, what they claim, against the fake
gateway of test_agent_protocol (a real websocket server on loopback, scripted by each test). No database."""

import asyncio
import concurrent.futures
import random
import re

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from fleet.agent.client import (
    FIRST_WORDS,
    Faults,
    cheat_applies,
    cheat_embed,
    decode_embedding,
    encode_embeddings,
    first_words,
)
from fleet.agent.models import get_runner
from fleet.agent.sim import is_cheater, run_fleet
from fleet.workloads.embedding import vectors_problem
from tests.fleet.test_agent_protocol import (
    DIMS,
    MODEL,
    fake_gateway,
    make_agent,
    next_peer,
    running,
    scenario,
    until,
)

pytestmark = pytest.mark.pure  # no database, layer or broker

TEXTS = [
    "An electric car parked in the garage overnight lends its idle computer to strangers",
    "Quarterly revenue of the bakery grew because the new oven doubled its bread output",
    "The goalkeeper saved a penalty in the last minute and the crowd ran onto the pitch",
    "Short text here",  # no more than four words: first_words leaves it as it is
]
OTHER_TEXTS = ["Volcanic ash closed the airport for three days", "A recipe for lemon cake with poppy seeds"]


@pytest.fixture(scope="module")
def embed():
    return get_runner(MODEL, "int8").embed


@pytest.fixture(scope="module")
def executor(embed):
    """The agents' inference threads (the model loaded already, so that a unit takes milliseconds)."""
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="test-cheats") as pool:
        yield pool


@pytest.fixture(scope="module")
def honest(embed):
    return embed(TEXTS)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def cheat(kind, embed, texts=TEXTS, earlier=None):
    vectors, _ = cheat_embed(kind, texts, embed=embed, dims=DIMS, rng=np.random.default_rng(5), earlier=earlier)
    return vectors


def shape_problem(vectors: np.ndarray, texts: int = len(TEXTS)) -> str | None:
    return vectors_problem(encode_embeddings(vectors), docs=texts, dims=DIMS)


# --- the result cheats, computed for real -------------------------------------------------------------

@pytest.mark.parametrize("kind", Faults.CHEATS)
def test_every_result_cheat_is_well_formed_so_that_the_shape_check_accepts_it(kind, embed):
    # Given a unit's texts and, for replay, another unit's embeddings,
    earlier = embed(OTHER_TEXTS)
    # when the cheat makes the result, then the gateway's shape check finds nothing wrong with it,
    vectors = cheat(kind, embed, earlier=earlier)
    assert shape_problem(vectors) is None
    # and it survives the wire's encoding unchanged (little-endian float32).
    decoded = np.stack([decode_embedding(b64) for b64 in encode_embeddings(vectors)])
    assert np.array_equal(decoded, np.asarray(vectors, dtype=np.float32))


def test_the_honest_result_is_the_true_embedding(embed, honest):
    vectors, computed = cheat_embed(None, TEXTS, embed=embed, dims=DIMS, rng=np.random.default_rng(0))
    assert np.array_equal(vectors, honest) and np.array_equal(computed, honest)


def test_random_vectors_are_unrelated_to_the_true_embeddings_and_to_each_other(embed, honest):
    vectors = cheat("random_vectors", embed)
    # 384 random dimensions: a cosine has a standard deviation of about 0.05.
    assert np.all(np.abs(cosines(vectors, honest)) < 0.3)
    assert np.all(np.abs(cosines(vectors, np.roll(vectors, 1, axis=0))) < 0.3)


def test_one_vector_sends_the_first_texts_true_embedding_for_every_text(embed, honest):
    vectors = cheat("one_vector", embed)
    assert all(np.array_equal(row, vectors[0]) for row in vectors)
    assert cosines(vectors[:1], honest[:1])[0] > 0.999  # the first text's embedding (computed alone)
    assert np.all(cosines(vectors[1:], honest[1:]) < 0.9)  # so the other rows are wrong


def test_rotate_rows_gives_each_row_its_neighbours_embedding(embed, honest):
    vectors = cheat("rotate_rows", embed)
    for i in range(len(TEXTS)):
        assert np.array_equal(vectors[i], honest[(i + 1) % len(TEXTS)])  # row i carries text i+1's vector
    assert np.all(cosines(vectors, honest) < 0.9)


def test_negate_sends_the_true_embeddings_pointing_the_other_way(embed, honest):
    assert np.allclose(cosines(cheat("negate", embed), honest), -1.0, atol=1e-6)


def test_replay_sends_an_earlier_units_rows_repeated_or_cut_to_the_count(embed):
    earlier = embed(OTHER_TEXTS)
    longer = cheat("replay", embed, earlier=earlier)  # 4 texts from 2 earlier rows: repeated
    assert [next(j for j, row in enumerate(earlier) if np.array_equal(v, row)) for v in longer] == [0, 1, 0, 1]
    shorter = cheat("replay", embed, texts=TEXTS[:1], earlier=earlier)  # 1 text: cut
    assert np.array_equal(shorter, earlier[:1])
    with pytest.raises(ValueError, match="earlier"):
        cheat("replay", embed, earlier=None)


def test_first_words_is_a_real_embedding_of_the_first_four_words_and_wrong_for_long_texts(embed, honest):
    vectors = cheat("first_words", embed)
    truncated = [first_words(text) for text in TEXTS]
    assert [len(t.split()) for t in truncated] == [FIRST_WORDS] * 3 + [3]
    # Really computed: each row is the embedding of its text's first four words,
    for row, text in zip(vectors, truncated):
        assert cosines(row[None], embed([text]))[0] > 0.999
    # which is not the embedding of a long text, and is that of a text of four words or fewer.
    similarity = cosines(vectors, honest)
    assert np.all(similarity[:3] < 0.95) and similarity[3] > 0.999


@pytest.mark.parametrize(
    "kind, texts, applies",
    [
        ("rotate_rows", ["one text only"], False),  # rotating a single row changes nothing
        ("one_vector", ["one text only"], False),
        ("first_words", ["four words at most", "three words here"], False),
        ("first_words", ["four words at most", "but this one has six words"], True),
        ("negate", [], False),  # a unit without texts has nothing to cheat on
        ("negate", ["one text only"], True),
        ("random_vectors", ["one text only"], True),
        ("replay", ["one text only"], True),
    ],
)
def test_a_cheat_that_cannot_change_the_result_is_not_applied(kind, texts, applies):
    assert cheat_applies(kind, texts) is applies


# --- the spec -----------------------------------------------------------------------------------------

def test_the_spec_reads_every_cheat_and_car_level_mode():
    spec = ("random_vectors=0.1,one_vector=0.1,rotate_rows=0.1,negate=0.2,replay=0.2,first_words=0.3,"
            "cheat_after=5,declare_mops=900000,seed=4")
    assert Faults.parse(spec) == Faults(random_vectors=0.1, one_vector=0.1, rotate_rows=0.1, negate=0.2, replay=0.2,
                                        first_words=0.3, cheat_after=5, declare_mops=900_000, seed=4)
    assert Faults.parse("black_hole=1") == Faults(black_hole=True)
    assert Faults.parse("hoard=1,drop_socket=0.1") == Faults(hoard=True, drop_socket=0.1)
    assert Faults.parse("hoard=0") == Faults() and not Faults.parse("hoard=0").enabled
    assert not Faults(cheat_after=3).enabled  # trust built for nothing: no cheat to turn to
    assert Faults(declare_mops=0).enabled and Faults(black_hole=True).enabled


@pytest.mark.parametrize(
    "spec, message",
    [
        ("negate=1.5", "negate=1.5 must be a number between 0 and 1"),
        ("replay=-0.1", "between 0 and 1"),
        ("first_words=much", "fault first_words='much': not a number"),
        ("negate=0.6,replay=0.6", "cheat probabilities add up to 1.2"),
        ("cheat_after=-1", "cheat_after=-1 must be a whole number of results, 0 or more"),
        ("cheat_after=2.5", "fault cheat_after='2.5': not a number"),
        ("black_hole=yes", "fault black_hole='yes': expected 0 or 1"),
        ("hoard=2", "fault hoard='2': expected 0 or 1"),
        ("black_hole=1,hoard=1", "black_hole and hoard exclude each other"),
        ("declare_mops=fast", "fault declare_mops='fast': not a number"),
        ("declare_mops=-5", "declare_mops=-5 must be a whole number of mega-ops per second"),
        ("declare_mops=1000000000000000", "must be a whole number of mega-ops per second"),
        ("cheat=0.1", "unknown fault 'cheat'"),
        ("negate=0.1,negate=0.2", "given twice"),
    ],
)
def test_a_bad_spec_is_refused_with_a_readable_message(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Faults.parse(spec)


def test_the_simulator_command_refuses_bad_cheats_and_shares_before_doing_anything():
    with pytest.raises(CommandError, match="--faults: .*negate=2"):
        call_command("simulate_fleet", "--faults", "negate=2")
    with pytest.raises(CommandError, match="--cheaters must be a share between 0 and 1"):
        call_command("simulate_fleet", "--faults", "negate=1", "--cheaters", "1.5")


@pytest.mark.django_db
def test_the_simulated_fleet_spreads_its_cars_over_owners_so_that_other_owners_can_check_them():
    from fleet.management.commands.simulate_fleet import Command
    from fleet.models import Vehicle

    with pytest.raises(CommandError, match="--owners must be 0"):
        call_command("simulate_fleet", "--owners", "-1")
    # By default each car is its own owner's, as in a real fleet;
    Command()._provision(4, 1, "sim@cars.example", 4)
    owners = list(Vehicle.objects.order_by("name").values_list("owner__email", flat=True))
    assert owners == ["sim@cars.example", "sim+2@cars.example", "sim+3@cars.example", "sim+4@cars.example"]
    # with fewer owners, the cars go round them; provisioning again reuses the cars, with new pairing codes.
    cars = Command()._provision(6, 1, "fleet@cars.example", 2)
    emails = [Vehicle.objects.get(name=car["name"], owner__email__startswith="fleet").owner.email for car in cars]
    assert emails == ["fleet@cars.example", "fleet+2@cars.example"] * 3
    assert Command()._provision(6, 1, "fleet@cars.example", 2)[0]["code"] != cars[0]["code"]
    assert Vehicle.objects.filter(owner__email__startswith="fleet").count() == 6


def test_cheats_are_drawn_with_their_probabilities_at_most_one_per_result():
    faults = Faults(random_vectors=0.1, one_vector=0.1, rotate_rows=0.1, negate=0.1, replay=0.1, first_words=0.2)
    rng = random.Random(3)
    draws = [faults.draw_cheat(rng) for _ in range(4000)]
    for kind in Faults.CHEATS:
        assert abs(draws.count(kind) / len(draws) - getattr(faults, kind)) < 0.03
    assert abs(draws.count(None) / len(draws) - 0.3) < 0.03
    assert all(Faults(negate=1.0).draw_cheat(rng) == "negate" for _ in range(100))


def test_cheats_leave_the_faults_draws_as_they_were():
    faults = Faults(drop_socket=0.3, stall=0.3, duplicate=0.3, corrupt=0.3, late=0.3, seed=7)
    cheating = Faults(drop_socket=0.3, stall=0.3, duplicate=0.3, corrupt=0.3, late=0.3, seed=7, negate=0.5,
                      replay=0.5, cheat_after=2, declare_mops=10)
    plain, mixed = random.Random(7), random.Random(7)
    assert [faults.draw(plain) for _ in range(200)] == [cheating.draw(mixed) for _ in range(200)]


# --- the cheats through the agent ---------------------------------------------------------------------

async def lease_units(peer, count: int, *, welcome=None) -> list[dict]:
    """Welcome the agent, then lease it ``count`` units of TEXTS one after the other; their results."""
    await peer.expect("hello")
    await peer.welcome(max_inflight=1, **(welcome or {}))
    results = []
    for unit_id in range(1, count + 1):
        await peer.expect("work.request")
        await peer.assign(unit_id, texts=TEXTS)
        results.append(await peer.expect("result"))
    return results


def rows(result: dict) -> np.ndarray:
    return np.stack([decode_embedding(b64) for b64 in result["embeddings_b64"]])


def test_the_agent_sends_a_negated_result_counts_it_and_keeps_the_message_valid(executor, honest):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(negate=1.0, seed=1))
            async with running(agent):
                peer = await next_peer(peers)
                (result,) = await lease_units(peer, 1)
                assert not peer.invalid
                assert vectors_problem(result["embeddings_b64"], docs=len(TEXTS), dims=DIMS) is None
                assert np.array_equal(rows(result), -honest)
        assert agent.stats.faults_injected == {"negate": 1} and agent.stats.units_done == 1

    scenario(run())


def test_cheat_after_sends_honest_results_first_then_cheats(executor, honest):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(negate=1.0, cheat_after=2, seed=1))
            async with running(agent):
                results = await lease_units(await next_peer(peers), 3)
        # Given cheat_after=2, the first two results are the true embeddings, the third is negated.
        assert [float(cosines(rows(r), honest).mean()) for r in results] == pytest.approx([1, 1, -1], abs=1e-5)
        assert agent.stats.faults_injected == {"negate": 1}

    scenario(run())


def test_replay_resends_an_earlier_units_result_computed_by_the_same_car(executor, honest):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(replay=1.0, cheat_after=1, seed=1))
            async with running(agent):
                peer = await next_peer(peers)
                first, second = await lease_units(peer, 2)
                await peer.expect("work.request")
                await peer.assign(3, texts=TEXTS[:2])  # a unit of two texts: the earlier rows, cut
                third = await peer.expect("result")
        assert np.array_equal(rows(first), honest)  # honest: unit 1 is what there is to replay
        assert second["unit_id"] == 2 and np.array_equal(rows(second), rows(first))
        assert np.array_equal(rows(third), honest[:2])
        assert agent.stats.faults_injected == {"replay": 2}

    scenario(run())


def test_replay_without_an_earlier_unit_falls_back_to_random_vectors(executor, honest):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(replay=1.0, seed=1))
            async with running(agent):
                (result,) = await lease_units(await next_peer(peers), 1)
        assert vectors_problem(result["embeddings_b64"], docs=len(TEXTS), dims=DIMS) is None
        assert np.all(np.abs(cosines(rows(result), honest)) < 0.3)
        assert agent.stats.faults_injected == {"random_vectors": 1}

    scenario(run())


# --- the car-level modes ------------------------------------------------------------------------------

def test_a_black_hole_says_hello_and_reports_but_never_asks_for_work(executor):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, telemetry_interval_s=0.5, faults=Faults(black_hole=True))
            async with running(agent):
                peer = await next_peer(peers)
                await peer.expect("hello")
                await peer.welcome(heartbeat_s=1, max_inflight=4)
                # An honest car asks for work at once after the welcome; this one only reports.
                await until(lambda: len(peer.sent("heartbeat")) >= 2 and len(peer.sent("telemetry")) >= 3, 6)
                assert peer.sent("work.request") == []
        assert agent.stats.faults_injected == {"black_hole": 1}

    scenario(run())


def test_a_hoarder_keeps_its_leases_and_never_sends_or_releases_them(executor):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(hoard=True, seed=1))
            async with running(agent):
                peer = await next_peer(peers)
                await peer.expect("hello")
                await peer.welcome(heartbeat_s=1, max_inflight=2)
                for unit_id in (1, 2):
                    await peer.expect("work.request")
                    await peer.assign(unit_id, texts=TEXTS)
                # Given two leases, it lists both in its heartbeats and sends no result,
                await peer.expect("heartbeat", timeout=3, where=lambda m: m["leases"] == [[1, 1], [2, 1]])
                await asyncio.sleep(1.2)
                assert peer.sent("result") == []
                # asks for more once the gateway takes one back,
                await peer.send("unit.withdraw", unit_id=1, epoch=1, reason="lease_expired")
                await peer.expect("work.request", timeout=3)
                # and gives nothing back when it starts driving,
                agent.sensors.driving = True
                await peer.expect("telemetry", where=lambda m: m["driving"])
                await asyncio.sleep(0.6)
            # nor when it stops.
            await asyncio.wait_for(peer.ended.wait(), 5)
            assert peer.sent("result") == [] and peer.sent("release") == []
            assert peer.ws.close_code == 1000
        stats = agent.stats
        assert stats.faults_injected == {"hoard": 2} and stats.units_done == 0 and stats.withdrawn == 1

    scenario(run())


def test_a_car_declaring_a_false_throughput_says_so_in_every_hello(executor):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(declare_mops=5_000_000))  # measured: 100,000
            async with running(agent):
                hello = await (await next_peer(peers)).expect("hello")
        assert hello["throughput_mops"] == {"int8": 5_000_000, "fp32": 5_000_000}
        assert agent.stats.faults_injected == {"declare_mops": 1}

    scenario(run())


# --- a share of the simulated fleet cheats ------------------------------------------------------------

def test_the_cheaters_share_is_drawn_per_car_from_its_seed():
    seeds = range(2000)
    assert not any(is_cheater(s, 0.0) for s in seeds) and all(is_cheater(s, 1.0) for s in seeds)
    share = sum(is_cheater(s, 0.25) for s in seeds) / len(seeds)
    assert 0.22 < share < 0.28
    assert [is_cheater(s, 0.25) for s in seeds] == [is_cheater(s, 0.25) for s in seeds]  # the same every time
    with pytest.raises(ValueError, match="between 0 and 1"):
        is_cheater(1, 1.5)


def test_run_fleet_gives_the_faults_only_to_the_cars_drawn_as_cheaters():
    cars = [{"token": f"dev_{i}", "name": f"car {i}", "hardware_watts": 100, "seed": i} for i in range(12)]
    faults = Faults(negate=0.5, replay=0.5, cheat_after=3, seed=9)

    async def run():
        async with fake_gateway() as (url, _peers):
            stop, agents = asyncio.Event(), []
            fleet = asyncio.create_task(run_fleet(url, cars, stop=stop, seed=1, faults=faults, cheaters=0.5,
                                                  agents=agents))
            await until(lambda: len(agents) == len(cars), 20)
            stop.set()
            await asyncio.wait_for(fleet, 15)
        return agents

    agents = asyncio.run(run())
    cheating = [agent.faults is not None for agent in agents]
    assert cheating == [is_cheater(car["seed"], 0.5) for car in cars]
    assert 0 < sum(cheating) < len(cars)
    for agent in agents:
        if agent.faults is not None:  # the spec as given, with a fault seed of the car's own
            assert agent.faults.negate == 0.5 and agent.faults.cheat_after == 3 and agent.faults.seed != 9
    assert len({agent.faults.seed for agent in agents if agent.faults is not None}) == sum(cheating)
