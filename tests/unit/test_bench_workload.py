"""Workload generation: exact sizes, growing prefixes, no overlapping users, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stackctl.bench.scenario import Scenario, ScenarioError, load_scenario
from stackctl.bench.workload import Workload
from stackctl.tokenizer import count_tokens, render_chat

SCENARIOS = Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios"


def small(**changes) -> Scenario:
    base = dict(
        users=3,
        rounds=4,
        system_prompt_tokens=37,
        history_tokens=101,
        question_tokens=7,
        answer_tokens=5,
        qps=(1.0,),
        duration_s=1.0,
        warmup_s=0.0,
        seed=1,
        stagger=False,
        turn_order="cyclic",
    )
    base.update(changes)
    return Scenario(**base)


def test_first_request_sizes_are_exact():
    workload = Workload(small())
    spec = workload.start_request(workload.take_idle_user())
    system, user = spec.messages
    assert system["role"] == "system" and count_tokens(system["content"]) == 37
    assert user["role"] == "user" and count_tokens(user["content"]) == 101 + 7
    # render_chat adds one role mark per message and the generation mark
    assert spec.prompt_tokens == count_tokens(render_chat(spec.messages)) == 37 + 101 + 7 + 3
    assert spec.max_tokens == 5 and spec.round_index == 1


def test_each_prompt_extends_the_previous_one():
    workload = Workload(small(users=1))
    previous = None
    for round_index in range(1, 5):
        conv = workload.take_idle_user()
        spec = workload.start_request(conv)
        assert spec.round_index == round_index
        prompt = render_chat(spec.messages)
        assert spec.prompt_tokens == count_tokens(prompt)
        if previous is not None:
            assert prompt.startswith(previous[0])
            # previous prompt + answer (3 words) + new question (7 words) + two role marks
            assert spec.prompt_tokens == previous[1] + 3 + 7 + 2
        previous = (prompt, spec.prompt_tokens)
        workload.finish_request(conv, "an honest answer")


def test_system_prompt_shared_and_histories_distinct():
    workload = Workload(small(users=3))
    specs = [workload.start_request(workload.take_idle_user()) for _ in range(3)]
    systems = {s.messages[0]["content"] for s in specs}
    assert len(systems) == 1
    first_history_words = [s.messages[1]["content"].split()[0] for s in specs]
    assert len(set(first_history_words)) == 3  # users diverge right after the shared prefix
    assert len({s.user_id for s in specs}) == 3


def test_a_user_never_has_two_requests_in_flight():
    workload = Workload(small(users=2))
    a = workload.take_idle_user()
    workload.start_request(a)
    with pytest.raises(RuntimeError):
        workload.start_request(a)
    b = workload.take_idle_user()
    assert b is not a
    workload.start_request(b)
    assert workload.take_idle_user() is None  # both busy: the client must wait, not overlap
    workload.finish_request(a, "done")
    assert workload.take_idle_user() is a
    with pytest.raises(RuntimeError):
        workload.finish_request(a, "twice")


def test_finished_users_are_replaced_by_new_ones():
    workload = Workload(small(users=1, rounds=2))
    seen = []
    for _ in range(5):
        conv = workload.take_idle_user()
        spec = workload.start_request(conv)
        seen.append((spec.user_id, spec.round_index))
        workload.finish_request(conv, "ok")
    assert seen == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]
    assert workload.in_flight == 0


def test_stagger_spreads_starting_rounds():
    workload = Workload(small(users=4, rounds=4, stagger=True))
    rounds = [workload.start_request(workload.take_idle_user()).round_index for _ in range(4)]
    assert rounds == [1, 2, 3, 4]


def test_failed_request_gets_a_stand_in_answer_of_the_budget():
    workload = Workload(small(users=1))
    conv = workload.take_idle_user()
    workload.start_request(conv)
    workload.finish_request(conv, None)
    assert conv.messages[-1]["role"] == "assistant"
    assert count_tokens(conv.messages[-1]["content"]) == 5


def _specs(scenario: Scenario, n: int):
    workload = Workload(scenario)
    out = []
    for _ in range(n):
        conv = workload.take_idle_user()
        spec = workload.start_request(conv)
        out.append(spec)
        workload.finish_request(conv, f"answer {spec.user_id} {spec.round_index}")
    return out


def test_deterministic_by_seed():
    assert _specs(small(seed=7), 8) == _specs(small(seed=7), 8)
    assert _specs(small(seed=7), 2)[0].messages != _specs(small(seed=8), 2)[0].messages


def test_sharegpt_turns_become_questions(tmp_path):
    data = [
        {
            "id": "a",
            "conversations": [
                {"from": "human", "value": "What is a cache?"},
                {
                    "from": "gpt",
                    "value": "A cache keeps results close so they are fast to reuse later.",
                },
                {"from": "human", "value": "And a prefix cache?"},
                {"from": "gpt", "value": "It reuses attention keys and values."},
            ],
        },
        {
            "id": "b",
            "conversations": [
                {"from": "system", "value": "ignored"},
                {"from": "human", "value": "Hello there"},
                {"from": "gpt", "value": "Hi"},
            ],
        },
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    scenario = small(
        users=1, sharegpt=str(path), system_prompt_tokens=9, history_tokens=12, answer_tokens=6
    )
    workload = Workload(scenario)
    questions = {"What is a cache?", "And a prefix cache?", "Hello there"}
    budgets = {"What is a cache?": 6, "And a prefix cache?": 6, "Hello there": 1}
    conv = workload.take_idle_user()
    spec = workload.start_request(conv)
    assert count_tokens(spec.messages[0]["content"]) == 9
    first_user = spec.messages[1]["content"]
    question = first_user.split("\n\n", 1)[1]
    assert question in questions and spec.max_tokens == budgets[question]
    assert count_tokens(first_user) == 12 + count_tokens(question)
    workload.finish_request(conv, None)  # failed: the dataset's answer, cut to the budget
    assert count_tokens(conv.messages[-1]["content"]) == spec.max_tokens
    spec2 = workload.start_request(conv)
    assert spec2.messages[-1]["content"] in questions


def test_sharegpt_file_without_turns_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(ScenarioError, match="sharegpt"):
        Workload(small(sharegpt=str(path)))


def test_shipped_scenarios_load():
    reference = load_scenario(SCENARIOS / "reference.yaml")
    assert (
        reference.users,
        reference.system_prompt_tokens,
        reference.history_tokens,
        reference.answer_tokens,
    ) == (320, 1000, 20000, 100)
    demo = load_scenario(SCENARIOS / "demo.yaml")
    assert demo.users < reference.users


@pytest.mark.parametrize(
    "text, key",
    [
        ("users: 0\n", "users"),
        ("users: many\n", "users"),
        ("qps: [1, -2]\n", "qps"),
        ("qps: []\n", "qps"),
        ("histroy_tokens: 5\n", "histroy_tokens"),
        ("duration_s: 0\n", "duration_s"),
        ("stagger: maybe\n", "stagger"),
    ],
)
def test_bad_scenario_names_file_and_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(path) in str(info.value) and f"'{key}'" in str(info.value)
    assert info.value.exit_code == 2


def test_scenario_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="mapping"):
        load_scenario(path)


def test_random_turn_order_breaks_round_robin_alignment():
    """With 16 users and 8 engines, a cyclic order would pin user k to engine k mod 8."""
    workload = Workload(small(users=16, rounds=50, turn_order="random"))
    engines_seen: dict[int, set[int]] = {}
    for arrival in range(400):
        conv = workload.take_idle_user()
        engines_seen.setdefault(conv.user_id, set()).add(arrival % 8)  # round-robin's choice
        workload.start_request(conv)
        workload.finish_request(conv, "ok")
    assert sum(len(s) > 1 for s in engines_seen.values()) >= 12


def test_every_user_asks_once_before_anyone_asks_again():
    workload = Workload(small(users=5, rounds=4, turn_order="random"))
    first = []
    for _ in range(5):
        conv = workload.take_idle_user()
        first.append(conv.user_id)
        workload.start_request(conv)
        workload.finish_request(conv, "ok")
    assert first == [0, 1, 2, 3, 4]
