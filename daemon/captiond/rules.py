"""The rules that judge a decode's text: what was not heard, what is a guess, what loops.

Every threshold lives in one frozen TextRules per model family. Whisper's own three (compression
ratio, average log-probability, no-speech probability) hold for every Whisper model; the others were
fitted by measurement on tiny.en (docs/how-it-works.md has the figures) and are off for any other
model until they are measured there, so a rule fitted to tiny.en never silently applies to base.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Sequence

from .events import Word

PUNCTUATION = ".,!?;:\"'()[]…-"


@dataclass(frozen=True)
class TextRules:
    """Thresholds of the text rules for one model family."""

    max_compression: float = 2.4
    """Gzip compression ratio above which a segment looks like a loop (Whisper's own threshold)."""
    min_logprob: float = -1.0
    """Average token log-probability below which a segment is doubtful (Whisper's own threshold)."""
    max_no_speech: float = 0.6
    """No-speech probability above which Whisper doubts there is speech (Whisper's own threshold)."""
    loop_words: int = 4
    """Longest phrase, in words, whose repeats are taken for a decoder loop."""
    loop_repeats: int = 4
    """Times a phrase said in a row that make a loop (the repetition flag)."""
    loop_cut_words: int = 8
    """Longest phrase, in words, whose repeats are cut out of a final ("thank you for your time," six times)."""
    loop_cut_repeats: int = 3
    """Times a phrase said in a row that are cut back to once."""
    loop_cut_min_words: int = 6
    """Fewest words such repeats must take in all to be cut ("five five five" is speech)."""
    unheard_s: float = 0.04
    """Zero-length words this close to the audio's end, in seconds, have no audio of their own (0: rule off)."""
    withhold_p: float = 0.0
    """A first word less probable than this, where Whisper hears no speech, is a guess (0: rule off)."""
    sure_no_speech: float = 1.0
    """No-speech probability at which such a guess is withheld whatever follows it."""
    tail_p: float = 0.0
    """Last words less probable than this, begun near the last voiced frame, are the decoder running on (0: off)."""
    tail_s: float = 0.3
    """How long before the last voiced frame's end such a word may begin, in seconds (word times are rough)."""
    sentence_words: int = 3
    """Fewest words of a decode's last sentence that let a pause end the utterance early (gate.sentence_end_ms)."""


WHISPER = TextRules()
"""Any Whisper model: Whisper's own thresholds and the rules that hold by construction."""

TINY_EN = TextRules(withhold_p=0.05, sure_no_speech=0.8, tail_p=0.5)
"""tiny.en, on which the fitted rules were measured."""


def rules_for(model: str) -> TextRules:
    """The rules for a model by its display name (tiny.en for the bundled model)."""
    return TINY_EN if model.startswith("tiny.en") else WHISPER


def bare(word: str) -> str:
    """A word as compared with another: no punctuation around it, lower case."""
    return word.strip(PUNCTUATION).lower()


def unheard(words: Sequence[Word], seconds: float, rules: TextRules) -> int:
    """How many of the last words the decoder placed after the audio it had: a run of zero-length
    words within unheard_s of the end that is a phrase (two words or more) or repeats the phrase
    before it. tiny.en does that after short audio ("10 of clubs? 10 of clubs?" at 1.18 s of 1.20 s;
    "5, 5, 5, 5" for "five five") and after long windows ("… the conference. we'll see you guys in
    the next video", every word at 10.30 s of 10.33 s). A single real word squeezed to the end
    ("uh…") stays unless it repeats the one before it."""
    if not rules.unheard_s:
        return 0
    trailing = 0
    for w in reversed(words):
        if not (w.end <= w.start and w.end >= seconds - rules.unheard_s):
            break
        trailing += 1
    if trailing >= 2:
        return trailing
    said = [bare(w.word) for w in words]
    return trailing if trailing and len(said) > 1 and said[-1] == said[-2] else 0


_ENDS = (".", "?", "!", "。", "？", "！")
_CLOSERS = "\"')]”’»」』）"
_TITLES = frozenset({"mr", "mrs", "ms", "mx", "dr", "prof"})
"""Abbreviations that stand before a name, so never end a sentence ("And Mr. | John Dashwood")."""
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")
"""Kana and ideographs: Chinese and Japanese write no spaces, so each counts as a word."""
_AFTER_FULL_WIDTH_END = re.compile("([。？！][" + re.escape(_CLOSERS) + "]*)")
_HESITATION = re.compile(r"(u+h+|u+h*m+|e+r+m*|e+h+|e+u+h+|a+h+|h+m+|m+h*m+|э+м*|м+)", re.IGNORECASE)
"""Filled pauses (uh, um, er, hmm, mmm; French euh, Russian э): a speaker says them to hold the floor,
so they neither end a sentence nor count among its words ("Montreal forced, uh, um, uh, mmm, mmm." was
ended there at a 300 ms pause, and "forced aligner", decoded alone, came out "for a still")."""


def ends_sentence(text: str, rules: TextRules) -> bool:
    """True when text ends as a sentence does (. ? ! and their full-width forms), not trailing off
    ("...", "…"), mid-clause, on a title ("Mr.") or on a filled pause ("um."), and that last sentence
    has at least sentence_words words besides filled pauses. Whisper writes a full stop after a single
    slowly said word ("Montreal. Forced? A liner.", "forced. forced"), and an utterance ended there
    left the next word to be decoded alone ("Forst"). The rule can only make an utterance wait its
    full hangover, so it holds for any model."""
    def ends(word: str) -> bool:
        word = word.rstrip(_CLOSERS)
        return (word.endswith(_ENDS) and not word.endswith(("..", "…"))
                and word.rstrip(".").lstrip(PUNCTUATION).lower() not in _TITLES)

    def words(token: str) -> int:
        return len(_CJK.findall(token)) or (any(c.isalnum() for c in token) and not hesitation(token))

    def hesitation(token: str) -> bool:
        return _HESITATION.fullmatch(token.strip(PUNCTUATION + _CLOSERS + "。？！，")) is not None

    said = _AFTER_FULL_WIDTH_END.sub(r"\1 ", text).split()
    if not said or not ends(said[-1]) or hesitation(said[-1]):
        return False
    last = [said[-1], *itertools.takewhile(lambda w: not ends(w), reversed(said[:-1]))]
    return sum(words(w) for w in last) >= rules.sentence_words


def tail_guesses(words: Sequence[Word], voiced_end: float, rules: TextRules) -> int:
    """How many of the last words begin at most tail_s before the last voiced frame's end
    (`voiced_end`, seconds into the decoded audio) and are more likely wrong than right: the
    decoder running on past the speech ("… or 8 for more options. as." p 0.06; "… the conference.
    And As always," p 0.02, 0.01, 0.38, begun 0.1 s before the voiced end)."""
    n = 0
    for w in reversed(words):
        if not (rules.tail_p and w.start >= voiced_end - rules.tail_s and w.p < rules.tail_p):
            break
        n += 1
    return n


def _runs(said: list[str], longest: int):
    """Every (start, phrase length, times said in a row) of phrases of 1 to `longest` words, in order."""
    for i in range(len(said)):
        for n in range(1, longest + 1):
            phrase = said[i:i + n]
            if len(phrase) < n:
                break
            k = 1
            while said[i + k * n:i + (k + 1) * n] == phrase:
                k += 1
            yield i, n, k


def loop(words: Sequence[str], rules: TextRules, after: int = 0) -> tuple[int, int] | None:
    """(first, end) of the first loop with first >= `after`: words[first:end] only say again,
    loop_cut_repeats times or more in all, a phrase of up to loop_cut_words words that ends at
    `first`; None when nothing loops. Real speech repeats itself too ("Hello? Hello?", "five five
    five"), so a loop needs at least loop_cut_min_words words in all."""
    for i, n, k in _runs([bare(w) for w in words], rules.loop_cut_words):
        if k >= rules.loop_cut_repeats and n * k >= rules.loop_cut_min_words and i + n >= after:
            return i + n, i + k * n
    return None


def looping(words: Sequence[str], rules: TextRules) -> bool:
    """True when some phrase of 1 to loop_words words repeats loop_repeats or more times in a row."""
    return any(k >= rules.loop_repeats for _, _, k in _runs([bare(w) for w in words], rules.loop_words))


def doubtful(avg_logprob: float, compression_ratio: float, no_speech_prob: float, rules: TextRules) -> bool:
    """Whisper's own test of a decode that is probably not what was said."""
    return (compression_ratio > rules.max_compression or avg_logprob < rules.min_logprob
            or no_speech_prob > rules.max_no_speech)


def trusted(text: str, avg_logprob: float, compression_ratio: float, no_speech_prob: float,
            rules: TextRules, looped: bool | None = None) -> bool:
    """True when Whisper itself trusts a decode: it has text, passes the doubtful() thresholds and does
    not loop (`looped`, when the caller judged that by the loop cut; else looping()). Only such a
    decode may stand as a final that revises stable words, which passed those tests in the checks
    that made them stable (an empty one would drop them all). A guard, not a fit: on replay of tune,
    held-out and dev it changed no final."""
    return (bool(text.strip()) and not doubtful(avg_logprob, compression_ratio, no_speech_prob, rules)
            and not (looping(text.split(), rules) if looped is None else looped))


def guessed(words: Sequence[Word], no_speech_prob: float, repetition: bool, rules: TextRules) -> bool:
    """True when Whisper hears no speech, the first word is a guess, and it is sure of that, or sure
    of no word, or the rest loops after the guess with rising confidence. tiny.en on noise bursts,
    hum and breaths: "You" (p 0.003-0.014, no-speech p 0.87-0.90), "Oh, oh, oh, …", "Thank you so
    much for watching" (0.003); in 119 utterances of real speech no first word below p 0.05 came
    with a no-speech p above 0.59. (The caller applies it only when no word was stable.)"""
    if not (words and no_speech_prob > rules.max_no_speech and words[0].p < rules.withhold_p):
        return False
    return no_speech_prob > rules.sure_no_speech or max(w.p for w in words) < rules.withhold_p or repetition
