"""Answer checking: does the generated text contain an accepted answer as a whole token?"""

from __future__ import annotations

import re
from typing import Iterable


def normalize(text: str) -> str:
    """Lower case with runs of whitespace collapsed (the model's spacing is not what we grade)."""
    return " ".join(text.lower().split())


def contains_answer(generated: str, answers: Iterable[str]) -> bool:
    """True when some accepted answer occurs in ``generated`` not glued to other letters or digits.

    Substring match as in RULER, with word boundaries so that '4412' does not match inside '44120'
    and 'teal' does not match inside 'steal'.
    """
    text = normalize(generated)
    for answer in answers:
        pattern = r"(?<![0-9a-z])" + re.escape(normalize(answer)) + r"(?![0-9a-z])"
        if re.search(pattern, text):
            return True
    return False
