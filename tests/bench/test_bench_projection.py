"""``bench/projection.py``: what N machines would carry, computed by hand for small inputs.

Three stages measured in one process each (relay 40,000/s on one server, x0.5 on
a cluster; ledger 30,000/s x0.8 reading 3 of every 4 log entries; fan-out
10,000/s x0.25), 16 busy partitions on 3 measured masters, a store that committed
30,000 ledger entries/s.
"""

from __future__ import annotations

import copy

import pytest

from bench import projection, records, report
from bench.projection import Inputs, Stage, busiest_share, project, project_one


def inputs(fanout_cpu: float = 100e-6, store_rate: float = 30_000.0) -> Inputs:
    return Inputs(
        stages=(
            Stage("relay", 40_000.0, 0.5, 5e-6),
            Stage("ledger", 30_000.0, 0.8, 4e-6, share=0.75),
            Stage("fanout", 10_000.0, 0.25, fanout_cpu),
        ),
        partitions=16,
        masters_measured=3,
        store_rate=store_rate,
        store_share=0.75,
    )


def test_busiest_share_deals_partitions_evenly_and_never_below_one() -> None:
    assert [busiest_share(16, n) for n in (1, 2, 3, 4, 5, 8, 16, 32)] == [16, 8, 6, 4, 4, 2, 1, 1]
    with pytest.raises(ValueError):
        busiest_share(16, 0)


def test_one_machine_carries_its_slowest_stage_in_log_entries() -> None:
    row = project_one(inputs(), 1)
    # Per process on a cluster, in log entries/s: relay 20,000; ledger 24,000 / 0.75
    # = 32,000; fan-out 2,500: the slowest.
    assert row.per_stage == pytest.approx({"relay": 20_000, "ledger": 32_000, "fanout": 2_500})
    assert row.machines_limit == pytest.approx(2_500) and row.slowest_stage == "fanout"
    # Redis: 5 + 4 x 0.75 + 100 = 108 µs per log entry; 3 masters, the busiest with 6
    # of the 16 partitions: 16/6 masters' worth.
    assert row.masters == 3 and row.partitions_per_master == 6
    assert row.redis_limit == pytest.approx((16 / 6) / 108e-6)
    assert row.store_limit == pytest.approx(40_000)  # 30,000 ledger entries / 0.75
    assert row.projected == pytest.approx(2_500) and row.bound_by == "machines (fanout)"


def test_machines_scale_with_the_busiest_ones_share_of_partitions() -> None:
    rows = project(inputs(), (1, 2, 3, 4, 8))
    assert [r.partitions_per_machine for r in rows] == [16, 8, 6, 4, 2]
    # Three machines hold 6/5/5: the one with 6 fills first, so 16/6 machines' worth.
    assert [r.machines_limit for r in rows] == pytest.approx(
        [2_500, 5_000, 2_500 * 16 / 6, 10_000, 20_000]
    )
    # One master per machine, at least the 3 measured.
    assert [r.masters for r in rows] == [3, 3, 3, 4, 8]
    assert rows[-1].redis_limit == pytest.approx(8 / 108e-6)


def test_past_one_machine_per_partition_machines_add_nothing() -> None:
    at16, at32 = project(inputs(store_rate=1e9), (16, 32))
    assert at16.partitions_per_machine == at32.partitions_per_machine == 1
    assert at32.machines_limit == pytest.approx(at16.machines_limit) == pytest.approx(40_000)
    assert at32.masters == 32 and at32.redis_limit == pytest.approx(16 / 108e-6)


def test_the_shared_store_caps_the_total_whatever_the_machines() -> None:
    rows = project(inputs(store_rate=27_000.0), (4, 8, 16))
    assert [r.store_limit for r in rows] == pytest.approx([36_000] * 3)
    assert [r.bound_by for r in rows] == ["machines (fanout)", "machines (fanout)", "SQL store"]
    assert rows[-1].projected == pytest.approx(36_000)


def test_redis_binds_when_an_entry_costs_the_masters_more_than_the_machines_can_send() -> None:
    row = project_one(inputs(fanout_cpu=2e-3), 1)
    cost = 5e-6 + 3e-6 + 2e-3
    assert row.redis_limit == pytest.approx((16 / 6) / cost)  # about 1,328 < 2,500
    assert row.bound_by == "Redis" and row.projected == pytest.approx(row.redis_limit)


def test_without_a_measured_redis_cost_there_is_no_redis_limit() -> None:
    data = inputs().to_dict()
    data["stages"][2]["redis_cpu_per_entry"] = None
    row = project_one(Inputs.from_dict(data), 1)
    assert row.redis_limit is None and row.bound_by == "machines (fanout)"
    assert "not measured" in projection.assumptions(Inputs.from_dict(data))[2]


def test_inputs_are_validated_and_survive_a_round_trip() -> None:
    assert Inputs.from_dict(inputs().to_dict()) == inputs()
    with pytest.raises(ValueError):
        Inputs(stages=(), partitions=16, masters_measured=3, store_rate=1.0)
    with pytest.raises(ValueError):
        Inputs(stages=(Stage("relay", 0.0, 1.0, None),), partitions=16, masters_measured=3,
               store_rate=1.0)  # fmt: skip
    with pytest.raises(ValueError):
        project_one(inputs(), 0)


def test_the_assumptions_carry_the_figures_they_rest_on() -> None:
    text = "\n".join(projection.assumptions(inputs()))
    assert "16 busy partitions" in text and "max(3, N) masters" in text
    assert "fanout 10,000/s x 0.25" in text and "108 µs" in text
    assert "30,000 entries/s through the ledger's handler" in text


def scale_record() -> dict:  # type: ignore[type-arg]
    rows = [row.to_dict() for row in project(inputs())]
    env = records.environment("7.0.15", [0.5, 0.5, 0.5])
    return records.build(
        "scale",
        env,
        parameters={"partitions": 16, "entries": 800, "escrows": 100, "entries_ledger": 700},
        figures={
            "layouts": {"cluster": {"partitions": 16, "redis_nodes": 3, "partitions_busy": 16}},
            "measures": {},
            "projection": {
                "inputs": inputs().to_dict(),
                "rows": rows,
                "assumptions": projection.assumptions(inputs()),
            },
        },
    )


def test_the_report_renders_the_projection_and_refuses_rows_its_inputs_do_not_give() -> None:
    record = scale_record()
    block = report.render(record)
    assert "| 1 | 16 | 3 | 2,500 (fanout) | 24,691 | 40,000 | 2,500 | machines (fanout) |" in block
    assert "| 8 | 2 | 8 | 20,000 (fanout) | 74,074 | 40,000 | 20,000 | machines (fanout) |" in block
    assert "* 16 busy partitions" in block
    edited = copy.deepcopy(record)
    edited["figures"]["projection"]["rows"][0]["projected"] = 25_000.0  # typed by hand
    with pytest.raises(ValueError, match="rows are not what its inputs give"):
        report.render(edited)
    edited = copy.deepcopy(record)
    edited["figures"]["projection"]["assumptions"][0] = "none"
    with pytest.raises(ValueError, match="assumptions"):
        report.render(edited)
