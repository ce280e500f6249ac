"""The multi-round QA workload: N concurrent users, each a growing conversation.

Every conversation starts with the system prompt shared by all users and a long history of
its own; each round appends a new question and, once answered, the answer, so each request's
prompt extends the previous one (the shape production-stack's multi-round QA benchmark uses
to show prefix caching and KV-aware routing). When a user has asked its last question it is
replaced by a new user, so the number of concurrent conversations stays constant.

Sizes are counted with the shared tokenizer (:mod:`stackctl.tokenizer`): the system prompt is
exactly ``system_prompt_tokens`` words, the history ``history_tokens`` and every filler
question ``question_tokens``. The rendered prompt adds one role mark per message and the
final generation mark (see :func:`stackctl.tokenizer.render_chat`).

This module does no I/O except reading a ShareGPT file; the client drives it.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from stackctl.bench.scenario import Scenario, ScenarioError
from stackctl.tokenizer import count_tokens, tokenize

# Plain words, so that filler text looks like text to humans reading a log; the simulator and
# the router only care that a prompt of N words is N tokens.
_VOCABULARY = tuple(
    """
    about above across after again against along also always among answer area around ask
    away back because become before began begin being below best better between big both bring
    build call came carry cause change check city close cold come common could country course
    cover cross cut dark day deep did different does done door down draw during each early earth
    east enough even ever every example eye face fact family far farm fast feel field figure find
    fire first fish five follow food foot force form found four free friend from full game gave
    give good great green ground group grow half hand happen hard have head hear heard heat help
    here high hold home hour house idea important inch interest island just keep kind king know
    land language large last late lead learn leave left less letter light line list little live
    long look made main make man many map mark measure might mile mind minute miss money moon
    more morning most mother mountain move much music must name near need never next night north
    note nothing notice number object often once only open order other over page paper part pass
    people picture piece place plain plan plant play point port pose power press problem produce
    product pull question quick rain reach read ready real record red remember rest right river
    road rock room round rule run said same saw school science sea second see seem self sentence
    serve set several shape ship short should show side simple since sing size sleep slow small
    snow some song soon sound south space special spell stand star start state stay step still
    stood stop story street strong study such sun sure surface table tail take talk teach tell
    test than thing think those though thought three through time together told took top toward
    town travel tree true try turn under unit until upon usual very voice vowel wait walk want
    warm watch water wave week weight well west what wheel where while white whole wind window
    wish with wonder wood word work world would write year young
    """.split()
)


@dataclass(frozen=True)
class Question:
    """One user turn: its text and the answer budget (the request's max_tokens)."""

    text: str
    max_tokens: int
    reference_answer: str | None = None  # the dataset's answer (ShareGPT mode), used on failure


class TextSource(Protocol):
    """Where prompt text comes from: seeded filler words or a ShareGPT file."""

    def system_prompt(self, tokens: int) -> str: ...

    def history(self, user_id: int, tokens: int) -> str: ...

    def question(self, user_id: int, round_index: int) -> Question: ...

    def fallback_answer(self, user_id: int, round_index: int, tokens: int) -> str: ...


def _seeded_words(seed: int, purpose: str, count: int, words=_VOCABULARY) -> list[str]:
    # A string seed is hashed with SHA-512 by random.seed: stable across runs and processes.
    return random.Random(f"{seed}/{purpose}").choices(words, k=count)


def _user_history(user_id: int, words: list[str]) -> str:
    """Start the history with the user's own tag so users diverge right after the system prompt."""
    if words:
        words = [f"user-{user_id}:"] + words[1:]
    return " ".join(words)


class FillerText:
    """Deterministic filler words from a fixed vocabulary, seeded per purpose."""

    def __init__(self, seed: int, question_tokens: int, answer_tokens: int):
        self.seed = seed
        self.question_tokens = question_tokens
        self.answer_tokens = answer_tokens

    def system_prompt(self, tokens: int) -> str:
        return " ".join(_seeded_words(self.seed, "system", tokens))

    def history(self, user_id: int, tokens: int) -> str:
        return _user_history(user_id, _seeded_words(self.seed, f"history/{user_id}", tokens))

    def question(self, user_id: int, round_index: int) -> Question:
        words = _seeded_words(self.seed, f"question/{user_id}/{round_index}", self.question_tokens)
        return Question(" ".join(words), self.answer_tokens)

    def fallback_answer(self, user_id: int, round_index: int, tokens: int) -> str:
        return " ".join(_seeded_words(self.seed, f"answer/{user_id}/{round_index}", tokens))


class ShareGPTText:
    """Real text from a ShareGPT-format JSON file (a list of ``{"conversations": [...]}``).

    Questions are the human turns and reference answers the gpt turns that follow them; each
    user walks the dataset from a seeded starting conversation. The system prompt and the
    histories are cut from the dataset's words to their exact sizes.
    """

    HUMAN = {"human", "user"}
    ASSISTANT = {"gpt", "chatgpt", "assistant", "bard", "model"}
    WORD_POOL = 2_000_000  # plenty of variety; a full ShareGPT dump would cost gigabytes as words

    def __init__(self, path: str | Path, seed: int, answer_tokens: int):
        self.seed = seed
        self.answer_tokens = answer_tokens
        self.pairs, self.conversation_starts = self._load(Path(path))
        self.words = self._word_pool()

    def _word_pool(self) -> list[str]:
        """The dataset's words in order, up to WORD_POOL (system prompt and histories are cut from it)."""
        words: list[str] = []
        for question, answer in self.pairs:
            words += tokenize(question) + tokenize(answer or "")
            if len(words) >= self.WORD_POOL:
                break
        return words[: self.WORD_POOL]

    def _load(self, path: Path) -> tuple[list[tuple[str, str | None]], list[int]]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ScenarioError(
                f"{path}: cannot read ShareGPT file (key 'sharegpt'): {exc}"
            ) from exc
        if isinstance(data, dict):
            data = data.get("data", [])
        pairs: list[tuple[str, str | None]] = []
        starts: list[int] = []
        for item in data if isinstance(data, list) else []:
            turns = item.get("conversations") if isinstance(item, dict) else None
            if not isinstance(turns, list):
                continue
            conversation = self._pairs(turns)
            if conversation:
                starts.append(len(pairs))
                pairs.extend(conversation)
        if not pairs:
            raise ScenarioError(
                f"{path}: no human turns found in the ShareGPT file (key 'sharegpt')"
            )
        return pairs, starts

    def _pairs(self, turns: list) -> list[tuple[str, str | None]]:
        pairs: list[tuple[str, str | None]] = []
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            speaker, text = str(turn.get("from", "")).lower(), turn.get("value")
            if not isinstance(text, str) or not text.split():
                continue
            if speaker in self.HUMAN:
                pairs.append((text, None))
            elif speaker in self.ASSISTANT and pairs and pairs[-1][1] is None:
                pairs[-1] = (pairs[-1][0], text)
        return pairs

    def _cut(self, start: int, tokens: int) -> list[str]:
        n = len(self.words)
        return [self.words[(start + i) % n] for i in range(tokens)]

    def system_prompt(self, tokens: int) -> str:
        return " ".join(self._cut(0, tokens))

    def history(self, user_id: int, tokens: int) -> str:
        start = random.Random(f"{self.seed}/history/{user_id}").randrange(len(self.words))
        return _user_history(user_id, self._cut(start, tokens))

    def _first_pair(self, user_id: int) -> int:
        rng = random.Random(f"{self.seed}/conversation/{user_id}")
        return self.conversation_starts[rng.randrange(len(self.conversation_starts))]

    def question(self, user_id: int, round_index: int) -> Question:
        text, answer = self.pairs[(self._first_pair(user_id) + round_index - 1) % len(self.pairs)]
        budget = (
            self.answer_tokens
            if answer is None
            else min(self.answer_tokens, max(1, count_tokens(answer)))
        )
        return Question(text, budget, answer)

    def fallback_answer(self, user_id: int, round_index: int, tokens: int) -> str:
        reference = self.question(user_id, round_index).reference_answer
        if reference:
            return " ".join(tokenize(reference)[:tokens])
        return " ".join(_seeded_words(self.seed, f"answer/{user_id}/{round_index}", tokens))


def text_source_for(scenario: Scenario) -> TextSource:
    if scenario.sharegpt:
        return ShareGPTText(scenario.sharegpt, scenario.seed, scenario.answer_tokens)
    return FillerText(scenario.seed, scenario.question_tokens, scenario.answer_tokens)


@dataclass(frozen=True)
class RequestSpec:
    """One chat request of one user: the whole conversation so far plus the new question."""

    user_id: int
    round_index: int  # 1-based round of this user's conversation
    messages: tuple[dict, ...]
    max_tokens: int
    prompt_tokens: int  # as the shared tokenizer counts render_chat(messages)
    # the conversation's first request: nothing of it but the shared system prompt can be cached
    first_turn: bool = False


@dataclass
class Conversation:
    """One user's conversation; at most one request in flight (``busy``)."""

    user_id: int
    first_round: int
    last_round: int
    messages: list[dict] = field(default_factory=list)
    next_round: int = 0
    busy: bool = False
    content_tokens: int = 0
    pending: Question | None = None

    def __post_init__(self) -> None:
        self.next_round = self.first_round

    @property
    def finished(self) -> bool:
        return self.next_round > self.last_round and not self.busy

    def append(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})
        self.content_tokens += count_tokens(content)

    @property
    def prompt_tokens(self) -> int:
        """render_chat's token count: contents + one role mark per message + generation mark."""
        return self.content_tokens + len(self.messages) + 1


class Workload:
    """The pool of concurrent users and whose turn it is.

    The initial users who have not asked yet go first, in order (so a warm-up of ``users``
    requests starts every conversation); they are users ``0 .. users - 1``, and
    ``first_turns_answered`` / ``first_turns_failed`` count how their first turns returned, so
    the warm-up can wait until none is still to come. After that, with ``turn_order: random``
    (the default) a uniformly random idle user asks next; the mean gap between one user's
    requests is still ``users / qps`` seconds, as in production-stack. A strictly ``cyclic``
    order would keep user k on engine k mod E under round-robin whenever E divides the user
    count, an artifact that hands the naive router perfect affinity no real traffic has.
    """

    def __init__(self, scenario: Scenario, text: TextSource | None = None):
        self.scenario = scenario
        self.text = text or text_source_for(scenario)
        self.system_prompt = self.text.system_prompt(scenario.system_prompt_tokens)
        self._next_user_id = 0
        self._rng = random.Random(f"turns-{scenario.seed}")
        self._fresh: deque[Conversation] = deque()  # not asked yet: first come, first served
        self._idle: deque[Conversation] = deque()  # asked before, now waiting for their turn
        self.in_flight = 0
        self.users_started = 0
        self.first_turns_answered = 0  # initial users whose first turn returned an answer
        self.first_turns_failed = 0  # ... returned an error (or was cancelled): still cold
        for index in range(scenario.users):
            first = 1 + (index * scenario.rounds) // scenario.users if scenario.stagger else 1
            self._fresh.append(self._new_user(first))

    def _new_user(self, first_round: int) -> Conversation:
        user_id = self._next_user_id
        self._next_user_id += 1
        self.users_started += 1
        return Conversation(
            user_id=user_id, first_round=first_round, last_round=self.scenario.rounds
        )

    @property
    def idle_users(self) -> int:
        return len(self._fresh) + len(self._idle)

    @property
    def first_turns_pending(self) -> int:
        """Initial users whose first turn has not returned yet (not sent, or in flight)."""
        return self.scenario.users - self.first_turns_answered - self.first_turns_failed

    def take_idle_user(self) -> Conversation | None:
        """The next user to ask (see the class), or None when every user has a request in flight."""
        if self._fresh:
            return self._fresh.popleft()
        if not self._idle:
            return None
        if self.scenario.turn_order == "cyclic":
            return self._idle.popleft()
        index = self._rng.randrange(len(self._idle))
        self._idle.rotate(-index)
        return self._idle.popleft()

    def start_request(self, conv: Conversation) -> RequestSpec:
        """Append the next question to ``conv`` and return the request to send."""
        if conv.busy or conv.next_round > conv.last_round:
            raise RuntimeError(f"user {conv.user_id} cannot start a request now")
        round_index = conv.next_round
        question = self.text.question(conv.user_id, round_index)
        first_turn = not conv.messages
        if first_turn:
            conv.append("system", self.system_prompt)
            history = self.text.history(conv.user_id, self.scenario.history_tokens)
            conv.append("user", f"{history}\n\n{question.text}" if history else question.text)
        else:
            conv.append("user", question.text)
        conv.busy = True
        conv.pending = question
        self.in_flight += 1
        return RequestSpec(
            conv.user_id,
            round_index,
            tuple(conv.messages),
            question.max_tokens,
            conv.prompt_tokens,
            first_turn,
        )

    def finish_request(self, conv: Conversation, answer: str | None) -> None:
        """Append the answer (or a stand-in when the request failed) and make the user idle.

        A user who has asked its last question is replaced by a new user.
        """
        if not conv.busy:
            raise RuntimeError(f"user {conv.user_id} has no request in flight")
        round_index = conv.next_round
        budget = conv.pending.max_tokens if conv.pending else self.scenario.answer_tokens
        reply = answer if answer and answer.split() else None
        if round_index == conv.first_round and conv.user_id < self.scenario.users:
            # an initial user's first turn (see the class)
            if reply is None:
                self.first_turns_failed += 1
            else:
                self.first_turns_answered += 1
        if reply is None:
            reply = self.text.fallback_answer(conv.user_id, round_index, budget)
        conv.append("assistant", reply)
        conv.busy = False
        conv.pending = None
        conv.next_round += 1
        self.in_flight -= 1
        # A user who replaces a finished one joins the idle pool like everyone else: only the
        # initial population goes first (so a warm-up starts every conversation), otherwise
        # each point would open with a backlog of cold first requests.
        self._idle.append(self._new_user(1) if conv.finished else conv)
