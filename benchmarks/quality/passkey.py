"""Synthetic passkey-retrieval documents (Mohtashami & Jaggi, 2023), built at the token level.

A document is ``<s>`` + an instruction + filler sentences with one needle ("The pass key is
71432. Remember it. ...") after a chosen fraction of the filler + the question "What is the pass
key? The pass key is"; the answer is " 71432". Each piece is tokenized on its own and the ids are
concatenated, so training and evaluation see identical token sequences and the needle's depth
is exact in tokens (to within one filler sentence block).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, List, Optional, Sequence

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclasses.dataclass(frozen=True)
class PasskeyDoc:
    """prompt_ids: ``<s>`` .. question (what the model reads); answer_ids: the key's tokens;
    needle_start: index in prompt_ids of the needle's first token; depth: needle_start / len(prompt_ids)."""

    prompt_ids: List[int]
    answer_ids: List[int]
    needle_start: int
    key: str

    @property
    def depth(self) -> float:
        return self.needle_start / len(self.prompt_ids)

    @property
    def ids(self) -> List[int]:
        return self.prompt_ids + self.answer_ids


class PasskeyBuilder:
    """Builds passkey documents for one tokenizer (``encode``: text -> ids, no special tokens).
    ``bos_id`` None: no BOS token; ``intro`` / ``question``: the text before the filler and after
    it (a chat model's template goes around them: ``real_model.chat_passkey_builder``); ``answer``:
    the answer's format (``{key}`` is replaced)."""

    def __init__(self, encode: Callable[[str], List[int]], bos_id: Optional[int], digits: int = 5,
                 intro: str = INTRO, question: str = QUESTION, answer: str = ANSWER):
        self.encode = encode
        self.bos_id = bos_id
        self.bos = [] if bos_id is None else [bos_id]
        self.digits = digits
        self.intro = encode(intro)
        self.filler = encode(FILLER)
        self.question = encode(question)
        self.answer = answer

    def random_key(self, rng: random.Random) -> str:
        return str(rng.randrange(10 ** (self.digits - 1), 10 ** self.digits))

    def document(self, context_len: int, depth: float, key: str) -> PasskeyDoc:
        """The longest document whose prompt + answer fit in ``context_len`` tokens, with the needle
        after ``round(depth * filler blocks)`` filler blocks (depth in [0, 1])."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {depth}")
        needle = self.encode(NEEDLE.format(key=key))
        answer = self.encode(self.answer.format(key=key))
        fixed = len(self.bos) + len(self.intro) + len(needle) + len(self.question) + len(answer)
        blocks = (context_len - fixed) // len(self.filler)
        if blocks < 1:
            raise ValueError(f"context_len {context_len} is too short for a passkey document ({fixed} "
                             f"tokens without filler); use at least {fixed + len(self.filler)}")
        before = round(depth * blocks)
        head = self.bos + self.intro + self.filler * before
        prompt = head + needle + self.filler * (blocks - before) + self.question
        return PasskeyDoc(prompt, answer, len(head), key)

    def grid(self, context_lens: Sequence[int], depths: Sequence[float], trials: int, seed: int
             ) -> List[PasskeyDoc]:
        """``trials`` documents per (length, depth), keys drawn from ``seed``; length-major order."""
        rng = random.Random(seed)
        return [self.document(n, d, self.random_key(rng)) for n in context_lens for d in depths
                for _ in range(trials)]

    def random_document(self, max_len: int, min_len: int, rng: random.Random) -> PasskeyDoc:
        """Training sample: length uniform in [min_len, max_len], depth uniform in [0, 1]."""
        return self.document(rng.randint(min_len, max_len), rng.random(), self.random_key(rng))
