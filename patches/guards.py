"""Request guards: refuse, with a ValueError that SGLang's HTTP server turns into a 400, requests
that would otherwise take the server down."""

from __future__ import annotations

import numbers
import operator
from typing import Optional, Sequence


def check_input_ids(input_ids: Sequence[int], vocab_size: int) -> None:
    """Raise ValueError naming the first position whose id is not a token of the model's
    vocabulary ``[0, vocab_size)`` (an embedding read past the table kills the model process).
    One pass of ``min``/``max`` in C for the common, valid case."""
    if input_ids is None or len(input_ids) == 0:
        return
    try:
        if 0 <= min(input_ids) and max(input_ids) < vocab_size:
            return
    except TypeError:  # not all comparable numbers: find the bad one below
        pass
    for pos, token in enumerate(input_ids):
        try:
            if isinstance(token, bool):
                raise TypeError
            token = operator.index(token)  # ints, numpy and 0-d tensor integers
        except TypeError:
            raise ValueError(f"input_ids[{pos}] = {token!r} is not a token id "
                             f"(an integer in [0, {vocab_size}))") from None
        if not 0 <= token < vocab_size:
            raise ValueError(f"input_ids[{pos}] = {token} is outside the model's vocabulary [0, {vocab_size})")


NUMERIC_SAMPLING_PARAMS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p",
                           "frequency_penalty", "presence_penalty", "repetition_penalty", "n")


def check_sampling_params(params: Optional[dict]) -> None:
    """Raise ValueError naming the first numeric sampling parameter whose value is not a number
    (None, meaning the default, is fine)."""
    if not isinstance(params, dict):
        return
    for name in NUMERIC_SAMPLING_PARAMS:
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ValueError(f"sampling_params.{name} = {value!r} must be a number")
