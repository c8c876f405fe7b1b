"""Stable words: the words of the open utterance that every later partial begins with, and the final too
unless its own decode, standing unbound (asr.bind_finals), heard them otherwise.

Stabilisation is LocalAgreement-2: a word becomes stable once a check (a partial decoded as the
final will be) agrees on it with the partial before it, it is not the check's newest word, the
check heard at least stable_after_s of audio after it, and at least stable_from_s of audio in all.
A greedy decode's words never bind: they would bind the final to greedy mistakes ("How do you"
where beam 5 hears "Had he").
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Sequence

from .engine import Transcript
from .events import Word
from .rules import PUNCTUATION, TextRules, bare, loop

log = logging.getLogger(__name__)

_PROMPT_CHARS = 200
# Partials that began with the stable words and said nothing after them: then, until a word more is
# stable, their prefix leaves out the last stable word. A prefix ending inside a word Whisper writes
# otherwise ("VoiceOver" for its "VoiceOverIP") made base stop there on every decode while speech went on.
_STALLED = 2


def letters(word: str) -> int:
    """Letters and digits in a word (punctuation alone is no word)."""
    return sum(c.isalnum() for c in word)


def spoken(t: Transcript) -> list[Word]:
    """A decode's timed words that have letters: greedy decodes loop on " . . ." too."""
    return [w for w in t.words if letters(w.word)]


def agreed(a: list[str], b: list[str]) -> int:
    """Length of the common prefix of two word lists, ignoring case and punctuation."""
    n = 0
    for x, y in zip(a, b):
        if bare(x) != bare(y):
            break
        n += 1
    return n


def after(stable: str, text: str) -> str | None:
    """What `text` says after `stable` when it begins with it, comparing letters and digits only
    (case, spaces and punctuation aside); None when it does not begin with it.

    Character-wise, because a decode made to begin with the stable words may run on inside the last
    one: stable "... peppered flower", decode "... peppered, flower-fattened sauce".
    """
    key = [c.lower() for c in stable if c.isalnum()]
    i = j = 0
    while j < len(key) and i < len(text):
        if text[i].isalnum():
            if text[i].lower() != key[j]:
                return None
            j += 1
        i += 1
    if j < len(key):
        return None
    if stable and stable[-1] in PUNCTUATION:  # the stable word's punctuation stands: "aligner." then ", but" is " but"
        while i < len(text) and text[i] in PUNCTUATION:
            i += 1
    return text[i:]


def _prefix(words: list[str]) -> str:
    return " ".join(words).rstrip(".!?…")


def holding(words: Sequence[Word], stable: list[str]) -> int:
    """How many of a decode's first words it takes to say the stable words (the decoder may split
    or join words otherwise than they were made stable: "flower-fattened")."""
    need, have = sum(letters(w) for w in stable), 0
    for i, w in enumerate(words):
        if have >= need:
            return i
        have += letters(w.word)
    return len(words)


class StableWords:
    """The stable words of one utterance, those still in the window and those cut off it, and the
    newest partial's words after them (which the next check must agree with)."""

    def __init__(self, context: str, rules: TextRules, stable_after_s: float, stable_from_s: float = 0.0,
                 logger: logging.Logger | logging.LoggerAdapter = log) -> None:
        self._context = context
        self._log = logger
        self._rules = rules
        self._settle_s = stable_after_s
        self._from_s = stable_from_s
        self.done: list[str] = []
        """Stable words whose audio was cut off the window."""
        self.done_words: list[Word] = []
        """Their timings, in seconds into the utterance."""
        self.committed: list[str] = []
        """Stable words still in the window: every later partial of this utterance begins with them."""
        self.pending: list[str] = []
        """The newest partial's words after the stable ones."""
        self._stalled = 0  # partials since the last word became stable that said nothing after them

    @property
    def text(self) -> str:
        """All the stable words as text, those cut off the window included."""
        return " ".join(self.done + self.committed)

    @property
    def prefix(self) -> str:
        """The stable words in the window: the text every later decode must begin with.

        Without a sentence end after the last word: given "... aligner." tiny.en mostly stops
        there, and the words said after it were lost (in partials and the final alike).
        """
        return _prefix(self.committed)

    @property
    def partial_prefix(self) -> str:
        """The prefix a partial is decoded with: without the last stable word once _STALLED partials
        said nothing past it (the decode may then write that word otherwise; only what it says after
        the stable words, letter by letter, counts, so no stable word changes)."""
        return _prefix(self.committed[:-1] if self._stalled >= _STALLED else self.committed)

    @property
    def prompt(self) -> str:
        """What the decoder is told came before the window: context, then the words cut off it."""
        return " ".join(t for t in (self._context, *self.done) if t)[-_PROMPT_CHARS:]

    @property
    def context(self) -> str:
        """What the decoder is told came before the utterance."""
        return self._context[-_PROMPT_CHARS:]

    def kept_by(self, text: str, cut_off: bool = False) -> bool:
        """True when a decode's text begins with every stable word in the window (a bound final's must),
        and with those cut off it too if `cut_off` (a decode of the whole utterance)."""
        return after(self.text if cut_off else " ".join(self.committed), text) is not None

    def uncut(self) -> None:
        """Make the words cut off the window stable words in it again (the window is the whole utterance)."""
        self.committed = self.done + self.committed
        self.done, self.done_words = [], []

    def hear(self, t: Transcript, heard_s: float, checked: bool) -> bool:
        """Take a partial decode of `heard_s` seconds of the window; True when it began with the
        stable words. Only a `checked` decode makes words stable."""
        timed = spoken(t)
        said = [w.word for w in timed] if timed else [w for w in t.text.split() if letters(w)]
        # Past the stable words by the same letter-wise rule as the final, so a word that ran on
        # ("flower" -> "flower-fattened") is neither dropped here nor doubled there.
        rest = after(" ".join(self.committed), " ".join(said))
        if rest is not None and not any(letters(w) for w in rest.split()):
            self._stalled += 1
            if self._stalled == _STALLED and self.committed:
                self._log.debug("partials stop at the stable word %r: decoding them without it", self.committed[-1])
        # (a stable word's own punctuation, ". Forest" after stable "Montreal", is no word either)
        # A decode that does not begin with the stable words changes nothing (the final's own decode,
        # or one bound to them, decides).
        hypothesis = [w for w in rest.split() if letters(w)] if rest is not None else list(self.pending)
        skip = len(said) - len(hypothesis)
        looped = loop(hypothesis, self._rules)
        if looped:  # a loop's repeats are never shown or made stable ("Hello. Hello. Hello. …")
            hypothesis = hypothesis[:looped[0]]
        n = agreed(self.pending, hypothesis[:-1]) if checked and rest is not None else 0
        # Where Whisper doubts there is speech at all ("You" on a noise burst): show nothing new, and make
        # nothing stable, which would force it into the final past the no-speech check there. Where it
        # doubts its words: a guess made twice is still a guess (greedy partials said "I'm …" or "I
        # don't know" to breaths, p ~0.1), and once stable it is forced into the final.
        speech, sure = self._undoubted(t, skip if rest is not None else None, len(hypothesis))
        hypothesis, n = hypothesis[:speech], min(n, sure)
        if heard_s < self._from_s:  # a decode of the first second or two binds guesses ("Do lock" for "To lock")
            n = 0
        if timed:  # and only words the decoder heard at least stable_after_s of audio after
            settled = heard_s - self._settle_s
            n = min(n, sum(1 for _ in itertools.takewhile(lambda w: w.end <= settled, timed[skip:])))
        self.committed += hypothesis[:n]
        if n:
            self._stalled = 0
        self.pending = hypothesis[n:]
        return rest is not None

    def _undoubted(self, t: Transcript, skip: int | None, count: int) -> tuple[int, int]:
        """How many of a decode's `count` new words (its spoken words after the first `skip`) come before
        the first from a pass Whisper doubts holds speech, and before the first from a pass whose words
        it doubts. Whisper's no-speech and log-probability are per 30 s pass: past 30 s a window is heard
        in two, and a second pass of trailing audio that doubted speech had kept base from making any
        word of the first stable. Without word times, or when the new words are not the decode's (it did
        not begin with the stable words: `skip` None), the whole decode's doubt."""
        rules = self._rules
        doubts = [(seg.avg_logprob, seg.no_speech_prob) for seg in t.segments for w in seg.words if letters(w.word)]
        doubts = doubts[skip:] if doubts and skip is not None else [(t.avg_logprob, t.no_speech_prob)] * count
        speech = next((i for i, (_, p) in enumerate(doubts) if p > rules.max_no_speech), count)
        sure = next((i for i, (lp, p) in enumerate(doubts) if p > rules.max_no_speech or lp < rules.min_logprob), count)
        return min(speech, count), min(sure, count)

    def cut_point(self, timed: list[Word], offset: float,
                  pause_in: Callable[[float, float], float | None]) -> float | None:
        """Where to cut the window's front, in seconds into the window, between two stable words
        placed by `timed` (at the sentence end with the widest pause after it, else at the widest
        pause); the words before it leave the window for the prompt. None when there is no such place.
        `offset` is the window's start, in seconds into the utterance. Only a pause the gate heard is a
        place: `pause_in` says where one is between two window times (None if nowhere).

        A decode can leave words out and put the next word's start late: its "pause" was speech, and a
        cut there lost words not yet stable ("You have also [installed a set of sample sounds and]
        configuration files"). The gate's voiced frames say where the pauses are.
        """
        ends = list(itertools.accumulate(letters(w) for w in self.committed))  # letters up to each stable word
        cuts = []  # (sentence end, pause, where, window words before the cut, stable words before it)
        count = 0
        for i, (word, nxt) in enumerate(zip(timed, timed[1:])):
            count += letters(word.word)
            if count in ends:  # else not between two stable words (Whisper may split words differently)
                where = pause_in(word.end, nxt.start)
                if where is not None:
                    n = len(ends) - ends[::-1].index(count)
                    cuts.append((word.word.endswith((".", "?", "!")), nxt.start - word.end, where, i + 1, n))
        if not cuts:
            return None
        _, _, where, k, n = max(cuts)
        self.done += self.committed[:n]
        self.done_words += [Word(w.word, w.start + offset, w.end + offset, w.p) for w in timed[:k]]
        self.committed = self.committed[n:]
        return where
