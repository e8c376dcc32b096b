"""Cars never persist inputs (docs/vehicle-protocol.md, "Cars never persist inputs"): the agent holds a unit's
texts in memory only; its one file, the pairing state, holds the vehicle id and the token, nothing else,
even when it is saved while the agent holds leases. No Django, no database: the agent against the fake gateway
of test_agent_protocol."""

import asyncio
import json
import logging
import os

import pytest

from fleet.agent.__main__ import load_state, save_state
from tests.fleet.test_agent_protocol import (  # noqa: F401 -- executor and gated are fixtures
    executor,
    fake_gateway,
    gated,
    make_agent,
    next_peer,
    running,
    scenario,
    until,
)

pytestmark = pytest.mark.pure

DOCUMENTS = ["Confidential: the board of Acme approved the merger with Globex on 3 March.",
             "Patient 4411 was prescribed 20 mg of the study drug, twice a day."]
OTHER = ["Quarterly revenue of the northern region fell by 12 per cent."]


def files_under(root) -> dict[str, bytes]:
    return {os.path.join(folder, name): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(root) for name in names}


def test_the_state_file_saved_while_leases_are_held_holds_the_pairing_and_no_document(gated, tmp_path, monkeypatch,
                                                                                       caplog):
    # Given an agent whose home and working directory are an empty folder, holding two leases whose computing
    # is held up (their texts in its memory),
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    caplog.set_level(logging.DEBUG, logger="fleet.agent")
    state_file = tmp_path / ".fleet-agent.json"

    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, gated)
            async with running(agent):
                peer = await next_peer(peers)
                await peer.expect("hello")
                await peer.welcome(max_inflight=2)
                await peer.expect("work.request")
                await peer.assign(1, texts=DOCUMENTS)
                await peer.assign(2, texts=OTHER)
                await until(lambda: len(agent.held) == 2)
                assert [lease.texts for lease in agent.held.values()] == [DOCUMENTS, OTHER]
                # when the agent's state is saved now, with everything the agent holds offered to it,
                save_state(state_file, {"vehicle_id": 7, "token": "dev_test",
                                        "leases": {f"{u}/{e}": lease.texts for (u, e), lease in agent.held.items()},
                                        "texts": DOCUMENTS + OTHER})
                # and the agent then computes and sends the results,
                gated.gate.set()
                results = [await peer.expect("result") for _ in range(2)]
                assert sorted(r["unit_id"] for r in results) == [1, 2]
                await until(lambda: not agent.held)

    scenario(run())
    # then the state file holds the pairing only,
    assert json.loads(state_file.read_text()) == {"vehicle_id": 7, "token": "dev_test"}
    assert load_state(state_file) == {"vehicle_id": 7, "token": "dev_test"}
    assert oct(state_file.stat().st_mode & 0o777) == "0o600"
    # no file the agent could have written holds a document (or a word of one),
    written = files_under(tmp_path)
    assert list(written) == [str(state_file)]
    for content in written.values():
        for text in DOCUMENTS + OTHER:
            assert text.encode() not in content and text.split()[1].encode() not in content
    # and its log, even at debug level, names units but never their texts.
    log = "\n".join(record.getMessage() for record in caplog.records)
    assert "unit 1" in log or "leased unit 1" in log
    assert not any(text in log or text.split(":")[0] in log for text in DOCUMENTS + OTHER)
